"""The tests' one way to run the CLI: ``python -m services`` as a subprocess, or ``main(argv)``.

``run_cli`` (``cli`` from a coroutine) runs it to its end; ``Job`` runs it in the background the
way the Kubernetes Job does and reads its stderr on a thread, so a test can wait for a JSON log
event without blocking the event loop (a ``FaultProxy`` may run on it), then signal or kill the
process at a moment of its choosing; ``run_cli_in_process`` calls ``main(argv)`` for refusals
that happen before any connection. Each gives a ``CliRun``: exit status, output and the parsed
events. Every process gets a clean environment (``cli_environment``); ``Job`` kills its process
when its ``async with`` block ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pty
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, Literal, Self

import pytest
import structlog

from layer_cache.cache_types import CacheType
from migrations_mode.log_fields import FIELDS, UPSTREAM_EVENTS, UPSTREAM_SYNONYMS
from si_layer_cache.cli import main as cli_main
from tests.support import CUTOFF_RFC3339, REPO_ROOT

Event = dict[str, Any]
OutputFormat = Literal["json", "console"]

CLI_TIMEOUT_S = 60.0
WRITE_QUEUE_DIR_ENV = "SI_SDF__SERVER__WRITE_QUEUE_DIR"
_SERVER_ACCESS_SETTINGS = (
    "SI_SDF__SERVER__AUTH",
    "SI_SDF__SERVER__READ_TOKENS_FILE",
    "SI_SDF__SERVER__WRITE_TOKENS_FILE",
)

# Every CLI run's own write queue directory lives under this one, removed when the test process
# exits (a run's directory outlives the run: a test may restart a server on the same queue).
_WRITE_QUEUE_ROOT = tempfile.TemporaryDirectory(prefix="si-write-queues-")


def backfill_args(
    *extra: str,
    cutoff: str = CUTOFF_RFC3339,
    cache_types: str | Sequence[CacheType] = "cas",
    json_logs: bool = True,
    **flags: object,
) -> list[str]:
    """The flags of a backfill of ``cache_types`` below ``cutoff``, then ``flags`` by name
    (``key_batch_size=50``: ``--backfill-key-batch-size 50``); ``extra`` is appended."""
    named = [[f"--backfill-{name.replace('_', '-')}", str(value)] for name, value in flags.items()]
    return [
        "--migration-mode",
        "backfillLayerCache",
        *(["--log-json"] if json_logs else []),
        "--backfill-cutoff-timestamp",
        cutoff,
        "--backfill-cache-types",
        cache_types if isinstance(cache_types, str) else ",".join(cache_types),
        *(part for flag in named for part in flag),
        *extra,
    ]


def cli_environment(env: Mapping[str, str]) -> dict[str, str]:
    """A clean environment for the CLI: no inherited SI_ settings, only the given ones (and a
    fresh S3 write queue directory unless ``env`` names one, so servers never share a queue).
    Metrics are not exported over OTLP unless ``env`` sets an ``OTEL_`` variable (without one
    the CLI exports to the default endpoint, where no collector listens here), and a server runs
    open (``SI_SDF__SERVER__AUTH=none``) unless ``env`` sets the auth mode or a token file."""
    base = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SI_", "OTEL_", "AWS_"))
    }
    if not any(name.startswith("OTEL_") for name in env):
        base["OTEL_METRICS_EXPORTER"] = "none"
    if not any(name.startswith(_SERVER_ACCESS_SETTINGS) for name in env):
        base["SI_SDF__SERVER__AUTH"] = "none"  # a test of access control sets its own
    if WRITE_QUEUE_DIR_ENV not in env:
        base[WRITE_QUEUE_DIR_ENV] = tempfile.mkdtemp(prefix="queue-", dir=_WRITE_QUEUE_ROOT.name)
    return base | dict(env)


# --------------------------------------------------------------------------------------------
# A finished run


def _json_object(line: str) -> Event | None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def parse_event(line: str) -> Event:
    """One stderr line as a JSON log event; fails the test on anything else."""
    event = _json_object(line)
    if event is None:
        pytest.fail(f"stderr line is not a JSON object although --log-json was given: {line!r}")
    return event


@dataclass(frozen=True)
class CliRun:
    """A finished CLI run: its exit status and what it printed."""

    status: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def non_json(self) -> list[str]:
        """The stderr lines that are not a JSON object."""
        return [line for line in self.stderr_lines if _json_object(line) is None]

    @property
    def events(self) -> list[Event]:
        """Every stderr line as a JSON log event; fails the test if one is not."""
        return [parse_event(line) for line in self.stderr_lines]

    def named(self, name: str, cache_type: CacheType | str | None = None) -> list[Event]:
        """Events called ``name`` (of one cache, if given), in order."""
        return [
            event
            for event in self.events
            if event.get("event") == name
            and (cache_type is None or event.get("cache_type") == str(cache_type))
        ]

    def summary(self, cache_type: CacheType | str = "total") -> Event:
        """The ``backfill summary`` of one cache, or the total."""
        [found] = self.named("backfill summary", cache_type)
        return found

    def the_error(self) -> Event:
        """The one line a refused run prints: a JSON error event on stderr, no traceback, nothing
        on stdout."""
        assert "Traceback" not in self.stderr, self.stderr
        lines = self.stderr_lines
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{self.stderr}"
        assert self.non_json == [], self.stderr
        [event] = self.events
        assert event.get("level") == "error", event
        assert "exception" not in event, event
        assert self.stdout == ""
        return event

    def describe(self) -> str:
        return f"exit status {self.status}\n--- stderr ---\n{self.stderr[-6000:]}"

    def assert_log_vocabulary(self) -> None:
        """Every field of every event is in the backfill's vocabulary (``log_fields``), with
        upstream's names for the uploads in flight only on upstream's events, and upstream's
        events carry upstream's fields."""
        for event in self.events:
            name = event.get("event")
            fields = set(event) - {"event", "level", "timestamp"}
            unknown = sorted(fields - set(FIELDS))
            assert not unknown, f"{name!r}: fields outside log_fields.FIELDS: {unknown}"
            for field, owner in UPSTREAM_SYNONYMS.items():
                assert field not in fields or name == owner, f"{name!r} says {field}"
            assert set(UPSTREAM_EVENTS.get(str(name), ())) <= fields, event


def the_error_line(run: CliRun, output: OutputFormat = "json") -> str:
    """The single error line a refused run must print; returns its message."""
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr_lines
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{run.stderr}"
    if output == "console":
        return lines[0]
    event = parse_event(lines[0])
    assert event.get("level") == "error", event
    assert "exception" not in event, event
    message = event.get("event")
    assert isinstance(message, str), event
    assert message, event
    return message


# --------------------------------------------------------------------------------------------
# Running to the end


def _command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "services", *args]


def run_cli(args: Sequence[str], env: Mapping[str, str], *, timeout: float = 120) -> CliRun:
    """Run ``python -m services`` with exactly ``env`` (plus PATH) and capture its output."""
    result = subprocess.run(
        _command(args),
        env=cli_environment(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return CliRun(result.returncode, result.stdout, result.stderr)


def run_cli_on_a_terminal(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    timeout: float = 120,
    interrupt_when: Callable[[str], bool] | None = None,
) -> CliRun:
    """``run_cli`` with stderr on a pseudo-terminal, as an operator's shell runs it (console
    logs, the live display); ``CliRun.stderr`` is what the terminal received, escape codes
    included. ``interrupt_when``: Ctrl-C (SIGINT) once the terminal's text so far satisfies it."""
    controller, terminal = pty.openpty()
    received: list[bytes] = []
    try:
        process = subprocess.Popen(
            _command(args),
            env=cli_environment(env) | {"COLUMNS": "100", "TERM": "xterm"},
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
        )
        os.close(terminal)

        def read() -> None:
            interrupted = False
            while True:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the process ended and closed the terminal
                    return
                if not chunk:
                    return
                received.append(chunk)
                if (
                    interrupt_when is not None
                    and not interrupted
                    and interrupt_when(b"".join(received).decode(errors="replace"))
                ):
                    process.send_signal(signal.SIGINT)
                    interrupted = True

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        stdout, _ = process.communicate(timeout=timeout)
        reader.join(10)
    finally:
        os.close(controller)
    return CliRun(process.returncode, stdout, b"".join(received).decode(errors="replace"))


async def cli(
    args: Sequence[str], env: Mapping[str, str], *, within_s: float = CLI_TIMEOUT_S
) -> CliRun:
    """``run_cli`` without blocking the event loop."""
    return await asyncio.to_thread(run_cli, args, env, timeout=within_s)


def run_cli_in_process(
    args: Sequence[str],
    env: Mapping[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> CliRun:
    """Call the CLI's ``main(args)`` in this process with exactly the environment ``run_cli``
    would give the subprocess, and capture what it prints: for refusals that happen before any
    connection, without the cost of a process. The test must not run in an event loop (``main``
    calls ``asyncio.run``); structlog and the root logger, which ``main`` configures, are put
    back afterwards."""
    wanted = cli_environment(env)
    for name in os.environ.keys() - wanted.keys():
        monkeypatch.delenv(name)
    for name, value in wanted.items():
        monkeypatch.setenv(name, value)
    logging_config = structlog.get_config()
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    capsys.readouterr()
    try:
        status = cli_main(args)
    except SystemExit as exit_:  # argparse: usage errors, --help, --version
        status = int(exit_.code or 0)
    finally:
        structlog.configure(**logging_config)
        root.handlers = root_handlers
        root.setLevel(root_level)
    output = capsys.readouterr()
    return CliRun(status, output.out, output.err)


# --------------------------------------------------------------------------------------------
# Running in the background


class Job:
    """``python -m services`` running in the background; stderr read and parsed on a thread."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str]) -> None:
        self.process = subprocess.Popen(
            _command(args),
            env=cli_environment(env),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[Event] = []
        self._lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        assert self.process.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stderr,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            event = _json_object(line) if line.strip() else None
            with self._changed:
                self._lines.append(line)
                if event is not None:
                    self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def _wait_for_blocking(
        self, matches: Callable[[Event], bool], timeout: float, since: int
    ) -> Event | None:
        deadline = time.monotonic() + timeout
        index = since
        with self._changed:
            while True:
                while index < len(self.events):
                    if matches(self.events[index]):
                        return self.events[index]
                    index += 1
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    return None
                self._changed.wait(remaining)

    async def wait_for(
        self, matches: Callable[[Event], bool], within_s: float, *, since: int = 0
    ) -> Event | None:
        """The first event (from index ``since``) that ``matches``; None if the process ended
        or ``within_s`` passed first. Never blocks the event loop."""
        return await asyncio.to_thread(self._wait_for_blocking, matches, within_s, since)

    async def expect(self, matches: Callable[[Event], bool], within_s: float) -> Event:
        """The first event that ``matches``; fails the test if none comes (or the job ends)."""
        found = await self.wait_for(matches, within_s)
        if found is None:
            pytest.fail(
                f"no awaited event within {within_s} s (or the job ended):\n"
                + self.output()[-6000:]
            )
        return found

    async def wait_for_event(self, name: str, within_s: float, **fields: object) -> Event:
        """The first event called ``name`` with ``fields``; fails the test if none comes."""

        def matches(event: Event) -> bool:
            return event.get("event") == name and all(
                event.get(key) == value for key, value in fields.items()
            )

        found = await self.wait_for(matches, within_s)
        if found is None:
            raise AssertionError(
                f"no {name!r} event with {fields} within {within_s} s (or the job ended):\n"
                + self.output()[-6000:]
            )
        return found

    def output(self) -> str:
        """The stderr read so far."""
        with self._changed:
            return "".join(self._lines)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> bool:
        """SIGKILL; True if the process was still running."""
        if self.process.poll() is not None:
            return False
        self.process.kill()
        return True

    def send(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def finish(self, within_s: float = 60.0) -> CliRun:
        """Wait for the exit (killing the process after ``within_s``) and collect the output."""
        try:
            status = await asyncio.to_thread(self.process.wait, within_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 10)
            raise AssertionError(
                f"the job did not exit within {within_s} s:\n{self.output()[-6000:]}"
            ) from None
        await asyncio.to_thread(self._reader.join, 10)
        assert not self._reader.is_alive(), "stderr did not close"
        assert self.process.stdout is not None
        stdout = await asyncio.to_thread(self.process.stdout.read)
        self.process.stdout.close()
        assert self.process.stderr is not None
        self.process.stderr.close()
        return CliRun(status, stdout, self.output())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.process.poll() is None:
            self.process.kill()
        await asyncio.to_thread(self.process.wait, 10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None and not stream.closed:
                await asyncio.to_thread(stream.read)
                stream.close()


async def interrupt_backfill(
    args: Sequence[str], env: Mapping[str, str], signum: signal.Signals, *, after_rows: int
) -> CliRun:
    """Start a backfill, signal it once a checkpoint shows ``after_rows`` done, let it exit."""
    async with Job(args, env) as job:
        progress = await job.expect(
            lambda event: (
                event.get("event") == "backfill checkpoint" and event["processed"] >= after_rows
            ),
            30.0,
        )
        assert isinstance(progress["active_uploads"], int), progress
        job.send(signum)
        return await job.finish(30.0)
