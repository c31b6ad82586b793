"""``python -m si_layer_cache``: the same entrypoint as ``python -m services``."""

from si_layer_cache.cli import run

if __name__ == "__main__":
    run()
