"""`elision passes`: every registered pass with its options (name, type, default) and one line of doc.

    elision passes            # a table
    elision passes --json     # one JSON object: {"passes": [{name, approximate, doc, options: [...]}, ...]}

Options are written in a pipeline as `name{option=value;option=value}` (`elision compile --passes`).
"""
from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text  # plain text cells: pass docs mention [CLS], which rich would read as markup

from elision.cli import failures

out = Console(emoji=False)


def _default_text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "+".join(str(v) for v in value) or "(none)"
    return "''" if value == "" else str(value)


def register(app: typer.Typer) -> None:
    @app.command("passes")
    @failures.command
    def passes_cmd(
        as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
    ) -> None:
        """List every pass a pipeline (--passes) can name, with its options and what it does."""
        from elision.passes.catalog import describe_passes  # lazy: torch and the IR (`elision --help` stays fast)

        passes = describe_passes()
        if as_json:
            out.print_json(json.dumps({"passes": passes}))
            return
        table = Table(title="elision passes (pipeline syntax: name{option=value;option=value})", show_lines=True)
        for column in ("pass", "options (type = default)", "what it does"):
            table.add_column(column, overflow="fold")
        for p in passes:
            options = "\n".join(f"{o['name']}: {o['type']} = {_default_text(o['default'])}" for o in p["options"])
            doc = p["doc"] + (" Approximate: needs --approximate." if p["approximate"] else "")
            table.add_row(Text(p["name"]), Text(options or "(none)"), Text(doc))
        out.print(table)
