"""The `elision` console script: Ctrl-C at any moment, even while Python is still importing the command line (and
torch behind it), ends with one line, `error: interrupted`, and exit code 130 instead of a traceback.

This module imports nothing heavy itself: the interrupt can only be caught by code that is already running.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from elision.errors import INTERRUPTED_EXIT_CODE, caused_by_interrupt, interrupt_handler


def run() -> None:
    try:
        # From here on a Ctrl-C is a KeyboardInterrupt that this `try` (or the command's own cleanup) handles.
        signal.signal(signal.SIGINT, interrupt_handler)
        from elision.cli.main import main  # lazy: inside the `try`, so a Ctrl-C while it imports is handled

        code = main()
    except KeyboardInterrupt:
        code = _interrupted()
    except Exception as e:
        if not caused_by_interrupt(e):
            raise
        code = _interrupted()
    sys.exit(code)


def _interrupted() -> int:
    sys.stderr.write("error: interrupted\n")
    return INTERRUPTED_EXIT_CODE


def _interrupted_before_run(signum, frame) -> None:
    # Nothing has started yet (no output, no temporary files), so ending the process at once is safe.
    sys.stderr.write("error: interrupted\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED_EXIT_CODE)


def _started_as_the_command() -> bool:
    """True while the `elision` script or `python -m elision.cli` imports this module (not a test or a library)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return ((spec is not None and spec.name == "elision.cli.__main__")
            or Path(getattr(main, "__file__", None) or "").name == "elision")


# A Ctrl-C between the end of this import and `run()` entering its `try` would otherwise print a traceback from the
# caller (the console script or `__main__`); only the command installs this, never an importing library or test.
if _started_as_the_command():
    signal.signal(signal.SIGINT, _interrupted_before_run)


if __name__ == "__main__":
    run()
