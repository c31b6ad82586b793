"""``python -m devenv.fetch`` (``make tools``): fetch the test tools that are missing.

One table of tools (``TOOLS``: how each is found, how it is fetched, both in ``devenv.tools``);
each tool not found is fetched and looked up again. Exit status 0 when all are there, else 1
with one line on stderr per tool that could not be had.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from devenv.tools import (
    MissingTool,
    debian_binary,
    fetch_debian_package,
    install_s3rver,
    s3rver_script,
)


@dataclass(frozen=True)
class Tool:
    """A tool the tests need: how to find it (raises ``MissingTool``) and how to fetch it."""

    name: str
    find: Callable[[], object]
    fetch: Callable[[], str | None]


def _debian_tool(package: str, binary: str) -> Tool:
    return Tool(
        binary,
        lambda: debian_binary(package, binary),
        lambda: fetch_debian_package(package, binary),
    )


TOOLS = (
    _debian_tool("prometheus", "prometheus"),
    _debian_tool("victoria-metrics", "victoria-metrics"),
    Tool("s3rver", s3rver_script, install_s3rver),
)


def fetch_missing(tools: Sequence[Tool] = TOOLS) -> list[str]:
    """Fetch every tool not found; one line per tool that could not be had."""
    failures: list[str] = []
    for tool in tools:
        try:
            tool.find()
        except MissingTool:
            print(f"fetching {tool.name} ...", flush=True)
            failure = tool.fetch()
            if failure is None:
                try:
                    tool.find()
                except MissingTool as missing:
                    failure = str(missing)
            if failure is not None:
                failures.append(f"{tool.name}: {failure}")
    return failures


def main() -> None:
    """Fetch what is missing; exit 1 with one line per tool that could not be had."""
    failures = fetch_missing()
    for failure in failures:
        print(f"devenv.fetch: {failure}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
