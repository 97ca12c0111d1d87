"""Task plugins: every module here registers its task(s) when imported (see platform/registry.py)."""
