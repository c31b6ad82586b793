"""The backfill's log vocabulary (``migrations_mode.log_fields``), held against the code: every
field a backfill log call names is in the table with one meaning, no event uses a retired name,
upstream's two names for the uploads in flight appear only on upstream's two events, and
upstream's events carry upstream's fields."""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from layer_cache.cache_types import CacheType
from migrations_mode.display import ProgressReport
from migrations_mode.log_fields import FIELDS, RETIRED, UPSTREAM_EVENTS, UPSTREAM_SYNONYMS
from migrations_mode.progress import CacheStats
from migrations_mode.summary import CacheOutcome, Status, total_fields
from tests.support import REPO_ROOT

LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
# The command line's backfill parts (the rest of it is not the backfill's).
CLI_BACKFILL_FUNCTIONS = {"_backfill", "_comparison_verdict"}
# Functions whose returned dict literal becomes an event's fields.
FIELD_PRODUCERS = {"as_fields", "counts"}


@dataclass(frozen=True)
class LogCall:
    where: str
    event: str | None  # None: the name is computed
    fields: tuple[str, ...]


def _log_calls(tree: ast.AST, where: str) -> Iterator[LogCall]:
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in LEVELS
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "log"
        ):
            first = node.args[0] if node.args else None
            event = (
                first.value
                if isinstance(first, ast.Constant) and isinstance(first.value, str)
                else None
            )
            names = tuple(keyword.arg for keyword in node.keywords if keyword.arg is not None)
            yield LogCall(f"{where}:{node.lineno}", event, names)


def _produced_fields(tree: ast.AST, where: str) -> Iterator[LogCall]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in FIELD_PRODUCERS:
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return) and isinstance(inner.value, ast.Dict):
                    keys = inner.value.keys
                    names = tuple(
                        key.value
                        for key in keys
                        if isinstance(key, ast.Constant) and isinstance(key.value, str)
                    )
                    yield LogCall(f"{where}:{inner.lineno} ({node.name})", None, names)


def _dict_literals(tree: ast.AST, where: str) -> Iterator[LogCall]:
    """Dicts with string keys (the command line's verdict fields are built as one)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and node.keys:
            names = [
                key.value
                for key in node.keys
                if isinstance(key, ast.Constant) and isinstance(key.value, str)
            ]
            if len(names) == len(node.keys):
                yield LogCall(f"{where}:{node.lineno} (dict)", None, tuple(names))


def backfill_log_calls() -> list[LogCall]:
    """Every log call of the backfill, and every dict of fields it spreads into one."""
    calls: list[LogCall] = []
    for path in sorted((REPO_ROOT / "migrations_mode").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        calls += _log_calls(tree, path.name)
        calls += _produced_fields(tree, path.name)
    cli = REPO_ROOT / "si_layer_cache" / "cli.py"
    for node in ast.parse(cli.read_text(), str(cli)).body:
        if (
            isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef)
            and node.name in CLI_BACKFILL_FUNCTIONS
        ):
            calls += _log_calls(node, "cli.py")
            calls += _dict_literals(node, "cli.py")
    return calls


CALLS = backfill_log_calls()


def test_the_scan_sees_the_backfills_events() -> None:
    events = {call.event for call in CALLS}
    assert {*UPSTREAM_EVENTS, "backfill progress", "backfill failed", "backfill stopped"} <= events
    assert len(CALLS) > 30


@pytest.mark.parametrize("call", CALLS, ids=lambda call: call.where)
def test_every_field_is_in_the_vocabulary_and_none_is_retired(call: LogCall) -> None:
    unknown = [name for name in call.fields if name not in FIELDS]
    assert not unknown, f"{call.where} {call.event!r}: fields not in log_fields.FIELDS: {unknown}"
    retired = [name for name in call.fields if name in RETIRED]
    assert not retired, f"{call.where}: retired names {retired} (now {RETIRED})"


def test_upstreams_names_for_uploads_in_flight_only_on_upstreams_events() -> None:
    for call in CALLS:
        for name in call.fields:
            if name in UPSTREAM_SYNONYMS:
                assert call.event == UPSTREAM_SYNONYMS[name], (
                    f"{call.where}: {name} belongs on {UPSTREAM_SYNONYMS[name]!r} only; "
                    f"{call.event!r} says uploads_in_flight"
                )


@pytest.mark.parametrize("event", [event for event, fields in UPSTREAM_EVENTS.items() if fields])
def test_upstreams_events_carry_upstreams_fields(event: str) -> None:
    calls = [call for call in CALLS if call.event == event]
    assert calls, f"no log call of {event!r}"
    # cache_type comes from the cache task's bound context (bind_contextvars).
    expected = set(UPSTREAM_EVENTS[event]) - {"cache_type"}
    for call in calls:
        assert expected <= set(call.fields), f"{call.where}: {event!r} lacks upstream's fields"


def test_each_name_has_one_meaning_and_retired_names_are_gone_from_the_table() -> None:
    assert not set(RETIRED) & set(FIELDS)
    meanings = Counter(FIELDS.values())
    assert [meaning for meaning, count in meanings.items() if count > 1] == []
    assert set(UPSTREAM_SYNONYMS) <= set(FIELDS)


def test_the_progress_and_summary_events_use_the_vocabulary() -> None:
    report = ProgressReport(
        processed=1,
        rows_done_all_runs=2,
        rows_total_estimate=3,
        rows_remaining_estimate=1,
        percent_complete=66.7,
        recent_rows_per_s=0.5,
        eta_s=2.0,
        uploads_in_flight=1,
        upload_concurrency_limit=5,
        retried=0,
        completed=False,
    )
    outcome = CacheOutcome(CacheStats(CacheType.CAS), Status.COMPLETED)
    for fields in (report.as_fields(), outcome.as_fields(), total_fields([outcome])):
        assert set(fields) <= set(FIELDS)
        assert not set(fields) & set(RETIRED)
    # The quantities that differ are told apart by name, in both events.
    assert {"processed", "rows_done_all_runs", "recent_rows_per_s"} <= set(report.as_fields())
    assert {"processed", "rows_per_s"} <= set(outcome.as_fields())
