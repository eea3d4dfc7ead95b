"""`python -m elision.cli ...`: the same as the `elision` console script."""
from elision.cli.entry import run

run()
