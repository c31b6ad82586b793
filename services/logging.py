"""structlog set-up: JSON lines (``--log-json`` / ``SI_LOG_JSON``) or a human console, on stderr.

Levels: ``info`` for the events operators follow (start, ``backfill checkpoint``, summaries,
shutdown), ``warning`` for retried faults, ``error`` for what stops a run, ``debug`` per row
(``-v``). Events carry data as fields; ``bind_contextvars(cache_type=…)`` in each cache task adds
the cache to every line it logs. A processor redacts any field whose name says it holds a
secret, as a second line of defence behind ``SecretStr``, and tracebacks (``-v``) never include
frame locals, which would hold connection passwords. With ``--log-file-directory`` every line is
also appended as JSON to ``si-layer-cache.log`` there (rotated at 128 MiB, as sdf's file log).
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog
import structlog.stdlib
import structlog.tracebacks

_SECRET_FIELD_MARKERS = ("password", "secret", "token", "credential")
LOG_FILE_NAME = "si-layer-cache.log"
LOG_FILE_MAX_BYTES = 128 * 1024 * 1024
REDACTED = "**********"


_JSON_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace the value of any field whose name marks it as a secret."""
    for name in event_dict:
        if any(marker in name.lower() for marker in _SECRET_FIELD_MARKERS):
            event_dict[name] = REDACTED
    return event_dict


def level_for_verbosity(verbosity: int) -> int:
    """0 → info, 1 (-v) → debug; -vv also keeps library debug logs."""
    return logging.DEBUG if verbosity >= 1 else logging.INFO


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is now, so a live progress display that redirects it
    (rich) keeps log lines above the display instead of under it."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _JsonFileTee:
    """A processor that also appends each event, as a JSON line, to a size-rotated file."""

    def __init__(self, handler: logging.Handler) -> None:
        self.handler = handler
        self._render = structlog.processors.JSONRenderer()

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        line = self._render(logger, method, _JSON_TRACEBACKS(logger, method, dict(event_dict)))
        self.handler.emit(logging.makeLogRecord({"msg": line, "levelname": method.upper()}))
        return event_dict


def log_file_handler(directory: Path) -> logging.Handler:
    """``<directory>/si-layer-cache.log``, rotated at 128 MiB (upstream's size), 5 kept."""
    directory.mkdir(parents=True, exist_ok=True)
    return logging.handlers.RotatingFileHandler(
        directory / LOG_FILE_NAME, maxBytes=LOG_FILE_MAX_BYTES, backupCount=5, encoding="utf-8"
    )


def configure_logging(
    *,
    json: bool,
    verbosity: int = 0,
    stream: TextIO | None = None,
    colors: bool | None = None,
    file_directory: Path | None = None,
) -> None:
    """Configure structlog once for the process, and route library (stdlib) logging through the
    same renderer, so JSON output stays one JSON object per line.

    ``colors`` None colours the console when it is a terminal (``--no-color`` / ``--force-color``
    decide otherwise); ``file_directory`` also appends every line as JSON to a rotated file there
    (``--log-file-directory``, as sdf's)."""
    output: TextIO = stream or _CurrentStderr()  # type: ignore[assignment]
    coloured = output.isatty() if colors is None else colors
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(
            colors=coloured,
            exception_formatter=structlog.dev.RichTracebackFormatter(
                # Never show frame locals: they hold passwords and keys (e.g. connection
                # arguments). Rich colours a traceback whatever it is written to, so one sent
                # to a file or a pipe (``-v 2> run.log``) would carry escape codes: say none.
                show_locals=False,
                color_system="truecolor" if coloured else None,
            ),
        )
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    file_handler = None if file_directory is None else log_file_handler(file_directory)
    if file_handler is not None:
        shared.append(_JsonFileTee(file_handler))
    shared.append(_JSON_TRACEBACKS if json else structlog.dev.set_exc_info)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level_for_verbosity(verbosity)),
        logger_factory=structlog.PrintLoggerFactory(output),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(output)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    # The OTLP exporters warn of every retry; ``services.telemetry`` reports failed exports
    # itself (the first, and a count at exit), so theirs show only from -vv.
    logging.getLogger("opentelemetry.exporter").setLevel(
        logging.NOTSET if verbosity >= 2 else logging.ERROR
    )
