"""Access control's pure parts: token files, roles, the decision, the failure limiter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from layer_cache.errors import SettingsError, TokenFileError
from layer_cache_server.auth import (
    ALLOWED,
    FailureLimiter,
    Role,
    TokenFiles,
    bearer_token,
    decide,
    parse_tokens,
    required_role,
    server_access,
)
from services.settings import ServerAuth, ServerConfig

READER = "r" * 20
READER_NEXT = "s" * 24
WRITER = "w" * 32


def test_a_token_file_holds_one_token_a_line_with_blanks_and_comments_ignored() -> None:
    text = f"# rotated 2026-12-01\n{READER}\n\n  {READER_NEXT}  \n"
    assert parse_tokens(text, "f") == {READER, READER_NEXT}


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "no token"),
        ("# only a comment\n", "no token"),
        ("short\n", "at least"),
        ("two words in one line\n", "one word"),
    ],
)
def test_an_unusable_token_file_names_the_file_and_never_the_token(text: str, why: str) -> None:
    with pytest.raises(TokenFileError, match=why.split()[0]) as raised:
        parse_tokens(text, "READ_TOKENS_FILE /etc/t")
    assert "/etc/t" in str(raised.value)
    token = text.strip()
    if token and not token.startswith("#"):
        assert token not in str(raised.value)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        ("Basic YWJj", None),
        ("Bearer", None),
        ("", None),
        (None, None),
    ],
)
def test_the_bearer_token_is_read_from_the_authorization_header(
    header: str | None, token: str | None
) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    ("method", "path", "role"),
    [
        ("GET", "/healthz", None),
        ("GET", "/readyz", None),
        ("GET", "/v1/cas/abc", Role.READ),
        ("HEAD", "/v1/cas/abc", Role.READ),
        ("POST", "/v1/cas/get-bulk", Role.READ),
        ("PUT", "/v1/cas/abc", Role.WRITE),
        ("DELETE", "/v1/cas/abc", Role.WRITE),
        ("POST", "/v1/cas/abc", Role.WRITE),
    ],
)
def test_reads_need_a_read_token_and_everything_else_a_write_token(
    method: str, path: str, role: Role | None
) -> None:
    assert required_role(method, path) is role


def test_the_decision_for_each_role_and_token() -> None:
    assert decide(None, None, had_token=False) is ALLOWED
    assert decide(Role.READ, Role.READ, had_token=True) is ALLOWED
    assert decide(Role.READ, Role.WRITE, had_token=True) is ALLOWED
    assert decide(Role.WRITE, Role.WRITE, had_token=True) is ALLOWED
    forbidden = decide(Role.WRITE, Role.READ, had_token=True)
    assert forbidden.status == 403
    assert forbidden.headers is not None
    assert 'error="insufficient_scope"' in forbidden.headers["WWW-Authenticate"]
    missing = decide(Role.READ, None, had_token=False)
    assert missing.status == 401
    assert missing.headers == {"WWW-Authenticate": 'Bearer realm="si-layer-cache"'}
    unknown = decide(Role.READ, None, had_token=True)
    assert unknown.status == 401
    assert unknown.headers is not None
    assert 'error="invalid_token"' in unknown.headers["WWW-Authenticate"]


def write(path: Path, *tokens: str) -> Path:
    """Replace the file as Kubernetes replaces a mounted Secret: a new file renamed over it."""
    staged = path.with_suffix(".new")
    staged.write_text("".join(f"{token}\n" for token in tokens))
    os.replace(staged, path)
    return path


def test_roles_come_from_their_files_and_a_write_token_may_read(tmp_path: Path) -> None:
    files = TokenFiles(
        {
            Role.READ: write(tmp_path / "read", READER, READER_NEXT),
            Role.WRITE: write(tmp_path / "write", WRITER),
        }
    )
    assert files.role_of(READER) is Role.READ
    assert files.role_of(READER_NEXT) is Role.READ
    assert files.role_of(WRITER) is Role.WRITE
    assert files.role_of(WRITER + "x") is None
    assert files.counts() == {"read": 2, "write": 1}


def test_a_changed_file_is_reloaded_and_a_broken_one_keeps_the_previous_tokens(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "read", READER)
    files = TokenFiles({Role.READ: path})
    assert files.reload_changed() == []  # nothing changed

    write(path, READER, READER_NEXT)
    assert files.reload_changed() == [Role.READ]
    assert files.role_of(READER_NEXT) is Role.READ

    write(path, READER_NEXT)  # the old token removed
    assert files.reload_changed() == [Role.READ]
    assert files.role_of(READER) is None

    with capture_logs() as logs:
        write(path, "short")
        assert files.reload_changed() == []
        assert files.reload_changed() == []  # reported once, not every poll
    assert files.role_of(READER_NEXT) is Role.READ
    assert [entry["event"] for entry in logs] == [
        "token file not reloaded; the previous tokens stay"
    ]
    assert "short" not in str(logs[0])


def test_the_server_asks_for_tokens_unless_told_none_on_purpose(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="SI_SDF__SERVER__AUTH=none"):
        server_access(ServerConfig())
    assert server_access(ServerConfig(auth=ServerAuth.NONE)) is None
    files = server_access(ServerConfig(write_tokens_file=write(tmp_path / "w", WRITER)))
    assert files is not None
    assert files.role_of(WRITER) is Role.WRITE
    with pytest.raises(SettingsError, match="cannot read"):
        server_access(ServerConfig(read_tokens_file=tmp_path / "absent"))


def test_auth_none_with_token_files_is_refused() -> None:
    with pytest.raises(ValueError, match="AUTH is none"):
        ServerConfig(auth=ServerAuth.NONE, read_tokens_file=Path("/etc/tokens"))


def test_a_peer_is_held_back_after_its_burst_of_failures_and_let_in_as_it_slows() -> None:
    limiter = FailureLimiter(burst=3, rate_per_s=1.0)
    for moment in (0.0, 0.0, 0.0):
        assert not limiter.blocked("10.0.0.9", moment)
        limiter.failed("10.0.0.9", moment)
    assert limiter.blocked("10.0.0.9", 0.1)
    assert not limiter.blocked("10.0.0.10", 0.1)  # another peer is not affected
    assert not limiter.blocked("10.0.0.9", 1.1)  # one failure refilled


def test_the_limiter_forgets_the_least_recent_peers_beyond_its_bound() -> None:
    limiter = FailureLimiter(burst=1, rate_per_s=0.001, max_peers=2)
    for peer in ("a", "b", "c"):
        limiter.failed(peer, 0.0)
    assert not limiter.blocked("a", 0.0)  # forgotten
    assert limiter.blocked("c", 0.0)
