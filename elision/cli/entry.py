"""The `elision` console script: Ctrl-C at any moment, even while Python is still importing the command line (and
torch behind it), ends with one line, `error: interrupted`, and exit code 130 instead of a traceback.

This module imports nothing heavy itself: the interrupt can only be caught by code that is already running.
"""
from __future__ import annotations

import sys

from elision.errors import INTERRUPTED_EXIT_CODE


def run() -> None:
    try:
        from elision.cli.main import main

        code = main()
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        code = INTERRUPTED_EXIT_CODE
    sys.exit(code)


if __name__ == "__main__":
    run()
