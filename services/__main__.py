"""``python -m services``: the service entrypoint."""

from services.cli import run

if __name__ == "__main__":
    run()
