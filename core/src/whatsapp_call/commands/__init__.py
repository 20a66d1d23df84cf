"""CLI command groups kept out of cli.py so each stays small; cli.py registers them."""
