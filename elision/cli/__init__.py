"""The `elision` command line: `main` holds the app and `compile`; one module per other command."""
