"""Options several commands share, defined once so that they read the same everywhere."""
from __future__ import annotations

import typer

# package.module:factory specs import a module and call a function in it: arbitrary code, so only on request
TRUST_CODE = typer.Option(
    False, "--trust-code",
    help="allow a package.module:factory MODEL: elision imports that module and calls the factory, which runs "
         "arbitrary Python code (like Hugging Face's trust_remote_code); off by default")
