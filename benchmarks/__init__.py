"""The benchmark suite and its helpers (not part of the installed package)."""
