"""One module per `lookalike` verb; each defines `register(subparsers)` and optionally `ORDER`."""
