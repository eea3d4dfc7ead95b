"""How every `elision` command reports failure.

One line on stderr (`error: MESSAGE`), or, when the command was given `--json`, one JSON object on stdout
(`{"error": MESSAGE, "exit_code": CODE}`) so a script reading stdout never has to parse text. Exit codes: 2 bad
input, 3 verification failed, 130 interrupted (Ctrl-C), 1 a bug.

User text (model specs, paths, messages that quote them) is never read as rich markup or emoji codes: `no[/]such`
and `:boom:` print as typed.
"""
from __future__ import annotations

import functools
import json
import sys
from contextvars import ContextVar
from typing import Any, Callable

import typer
from rich.console import Console
from rich.text import Text

from elision.errors import INTERRUPTED_EXIT_CODE as INTERRUPTED, ElisionError, caused_by_interrupt

__all__ = ["INTERRUPTED", "check_prompt", "command", "fail", "json_errors", "one_line", "report", "report_usage_error",
           "reported", "restore", "stderr"]


_json_errors: ContextVar[bool] = ContextVar("elision_json_errors", default=False)
_reported = [0]  # failures reported so far in this process (see `reported`)


def stderr() -> Console:
    """A console on the current stderr (looked up per call: test runners swap sys.stderr)."""
    return Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)


def one_line(message: Any) -> str:
    """`message` on one line: the lines of a multi-line message joined with '; '."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(lines) if lines else "(no message)"


def json_errors(enabled: bool):
    """Report errors as JSON on stdout from now on, until the returned token is passed to `restore`."""
    return _json_errors.set(bool(enabled))


def restore(token) -> None:
    _json_errors.reset(token)


def report_usage_error(error) -> None:
    """A click usage error (unknown option, bad value, missing argument): the JSON error object in --json mode, else
    typer's usual usage panel."""
    if _json_errors.get():
        report(error.format_message(), error.exit_code)
        return
    from typer import rich_utils  # typer's own error panel, needed only when there is a usage error to show

    rich_utils.rich_format_error(error)


def report(message: Any, code: int = 2) -> None:
    """Print one failure: a line on stderr, or the JSON error object on stdout in --json mode."""
    text = one_line(message)
    _reported[0] += 1
    if _json_errors.get():
        sys.stdout.write(json.dumps({"error": text, "exit_code": code}) + "\n")
        sys.stdout.flush()
    else:
        stderr().print(Text.assemble(("error:", "bold red"), " ", text))


def reported() -> int:
    """How many failures were reported so far: lets `main` tell whether an exit code 130 was already explained (typer
    turns a Ctrl-C during argument parsing into a silent exit 130)."""
    return _reported[0]


def fail(message: Any, code: int = 2) -> typer.Exit:
    """Report `message` and return the typer.Exit to raise: `raise fail("...")`."""
    report(message, code)
    return typer.Exit(code)


def check_prompt(prompt: str) -> None:
    """Refuse a prompt that is not valid UTF-8 (the shell passed bytes Python could only keep as surrogates)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(prompt[e.start]) & 0xFF
        raise fail(f"the prompt is not valid UTF-8 text (byte 0x{byte:02x} at character {e.start}); pass text in "
                   f"UTF-8") from None


def command(func: Callable) -> Callable:
    """Decorator for a command function: --json (an `as_json` flag) switches errors to JSON, ElisionErrors (every
    artifact, export and spec error included) become one reported line and their exit code, Ctrl-C becomes
    `error: interrupted` and exit 130. Anything else is a bug and keeps its traceback."""

    @functools.wraps(func)
    def run(*args, **kwargs):
        as_json = kwargs.get("as_json")
        token = json_errors(as_json is True) if isinstance(as_json, bool) else None
        try:
            return func(*args, **kwargs)
        except ElisionError as e:
            raise fail(e, e.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", INTERRUPTED) from None
        except Exception as e:
            if caused_by_interrupt(e):
                raise fail("interrupted", INTERRUPTED) from None
            raise
        finally:
            if token is not None:
                restore(token)

    return run
