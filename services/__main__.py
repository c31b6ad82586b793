"""``python -m services``: the documented entrypoint, delegating to ``si_layer_cache.cli``.

This module is the program, not the library, so it is the one place in ``services`` that may
import the command line above it (the import-linter contract in pyproject.toml ignores it).
"""

from si_layer_cache.cli import run

if __name__ == "__main__":
    run()
