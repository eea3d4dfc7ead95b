"""The command line reads the same everywhere: one meaning per short flag, one spelling for ONNX Runtime
(`onnxruntime`), `elision passes` lists every registered pass with its real options, and `--help` stays light."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from elision.cli.main import app, main
from elision.passes.catalog import all_passes
from elision.passes.pipeline import parse_pipeline

REPO = Path(__file__).resolve().parents[2]


def _commands() -> dict:
    return typer.main.get_command(app).commands


def _options():
    """(command name, click option) for every option of every command."""
    for name, command in _commands().items():
        for param in command.params:
            if param.param_type_name == "option":
                yield name, param


def test_each_short_flag_means_one_thing_in_every_command():
    meanings: dict[str, set[str]] = {}
    for _, option in _options():
        longs = sorted(o for o in option.opts + option.secondary_opts if o.startswith("--"))
        for short in (o for o in option.opts if re.fullmatch(r"-[A-Za-z]", o)):
            meanings.setdefault(short, set()).add(longs[0] if longs else option.name)
    clashes = {s: m for s, m in meanings.items() if len(m) > 1}
    assert not clashes, clashes
    assert meanings["-p"] == {"--passes"} and meanings["-o"] == {"--output"}


def test_onnx_runtime_is_spelled_onnxruntime_in_options_and_values():
    alias_note = re.compile(r"\('?ort'? is accepted as an alias\)|\(`onnxruntime`, alias `onnx`")
    for command, option in _options():
        assert not any("ort" in re.split(r"[-_]", o) for o in option.opts), (command, option.opts)
        text = alias_note.sub("", option.help or "")
        assert not re.search(r"\bort\b", text, re.IGNORECASE), (command, option.opts, option.help)


@pytest.mark.parametrize("argv,alias", [
    (["decode-shape", "builtin:vecset-tiny", "--latents", "/no/such.safetensors", "-o", "m.glb", "--backend"], "ort"),
    (["tune", "builtin:minilm", "--plot", "/dev/null/p.png", "--measure"], "onnx"),
])
def test_the_old_spellings_are_aliases_that_help_names(argv, alias, capsys):
    """The alias reaches the same checks as the new spelling (here: the next bad input), never 'unknown backend'."""
    assert main([*argv, alias]) == 2
    err = capsys.readouterr().err
    assert "must be" not in err and err.startswith("error:")
    assert main([argv[0], "--help"]) == 0
    assert alias in capsys.readouterr().out


def test_help_of_every_command_imports_no_heavy_library():
    """`--help` stays well under a second: neither torch, numpy, onnxruntime nor transformers is imported for it
    (each command imports what it needs when it runs)."""
    names = sorted(_commands())
    script = ("import sys\nfrom elision.cli.main import main\n"
              f"for name in {names!r} + ['']:\n"
              "    main([name, '--help'] if name else ['--help'])\n"
              "print(sorted(m for m in ('torch', 'numpy', 'onnxruntime', 'transformers', 'ray') if m in sys.modules),"
              " file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]"


def test_passes_lists_every_registered_pass_with_its_options(capsys):
    assert main(["passes", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)["passes"]}
    registry = all_passes()
    assert set(listed) == set(registry)
    for name, cls in registry.items():
        entry = listed[name]
        assert entry["approximate"] == cls.approximate
        # one line of real doc, not the signature dataclasses write when a class has none
        assert entry["doc"] and "\n" not in entry["doc"] and not entry["doc"].startswith(cls.__name__ + "(")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert [o["name"] for o in entry["options"]] == list(fields)
        defaults = cls()
        for option in entry["options"]:
            assert option["type"]
            value = getattr(defaults, option["name"])
            assert option["default"] == (list(value) if isinstance(value, (tuple, frozenset)) else value)
            if option["default"] is None or option["default"] == []:
                continue
            # the listed default, written in a pipeline, configures the pass exactly as leaving it out does
            written = str(option["default"]).lower() if isinstance(option["default"], bool) else option["default"]
            assert parse_pipeline(f"{name}{{{option['name']}={written}}}") == [defaults]


def test_passes_table_names_every_pass(capsys):
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    for name in all_passes():
        assert name in text
    assert "keep: float = 1.0" in text and "needs --approximate" in text
