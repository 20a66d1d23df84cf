"""`serve --workers N`: a front process (HTTP) and N media worker processes (calls)."""
