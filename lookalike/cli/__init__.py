"""The `lookalike` command line: `main` finds one module per verb in `commands/`."""
