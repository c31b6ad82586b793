"""Who may use the layer cache API: bearer tokens from files, re-read when they change.

Two roles. A *read* token may ``GET``, ``HEAD`` and ``POST …/get-bulk``; a *write* token may do
that and ``PUT`` and evict. ``/healthz`` and ``/readyz`` answer without a token: Kubernetes'
probes carry none, and they say only whether the process is up and its backends answer (the
metrics are on their own port, scraped by Prometheus without a token, for the same reason).

``TokenFiles`` holds each role's tokens from its file (``SI_SDF__SERVER__READ_TOKENS_FILE``,
``…WRITE_TOKENS_FILE``): one token a line, blank lines and ``#`` comments ignored, at least
``MIN_TOKEN_LENGTH`` characters each, several per role so that a token is rotated without
downtime (add the new one, move clients, remove the old one). Only the tokens' SHA-256 digests
are kept; ``role_of`` compares the presented token's digest with *every* stored digest with
``hmac.compare_digest``, so neither which token matched nor how many there are shows in the
time it takes. ``watch`` stats the files every ``RELOAD_INTERVAL_S`` and reloads one whose
identity (inode, size, modification time) changed; Kubernetes updates a mounted Secret by
swapping a symlink, which this sees. A file that cannot be read or holds no valid token is one
error line, and the previous tokens stay. Token material is never logged, at any verbosity:
events say which file and how many tokens, never what they are.

``decide`` (pure) turns a request's method, path and ``Authorization`` header into an answer:
open, allowed, 401 with ``WWW-Authenticate: Bearer`` (no token, or an unknown one) or 403 (a
read token on a write). ``FailureLimiter`` keeps one peer that sends many bad tokens from
costing the others: past ``FAILURE_BURST`` failures (refilled at ``FAILURE_RATE_PER_S``) a
peer's requests without a valid token are answered 429 at once, connection closed, until it
slows down; a valid token is never held back, whoever else shares the address. Nothing here
owns a resource but the watch task, which the server starts and cancels.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import structlog

from layer_cache.errors import SettingsError, TokenFileError
from layer_cache_server.watched import FileIdentity, file_identity
from services.settings import ENV_PREFIX, ServerAuth, ServerConfig

log = structlog.get_logger(__name__)

MIN_TOKEN_LENGTH = 16
RELOAD_INTERVAL_S = 1.0
FAILURE_BURST = 20.0
FAILURE_RATE_PER_S = 10.0
MAX_TRACKED_PEERS = 4096
READ_TOKENS_ENV = f"{ENV_PREFIX}SERVER__READ_TOKENS_FILE"
WRITE_TOKENS_ENV = f"{ENV_PREFIX}SERVER__WRITE_TOKENS_FILE"
REALM = "si-layer-cache"
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
READ_METHODS = frozenset({"GET", "HEAD"})


class Role(StrEnum):
    """What a token may do."""

    READ = "read"
    WRITE = "write"


def parse_tokens(text: str, source: str) -> frozenset[str]:
    """The tokens of a file's text; ``TokenFileError`` for a short token or none at all."""
    tokens = set()
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if len(token) < MIN_TOKEN_LENGTH or any(char.isspace() for char in token):
            raise TokenFileError(
                f"{source} line {number}: a token is one word of at least {MIN_TOKEN_LENGTH} "
                "characters"
            )
        tokens.add(token)
    if not tokens:
        raise TokenFileError(f"{source} holds no token")
    return frozenset(tokens)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def required_role(method: str, path: str) -> Role | None:
    """The role a request needs; None for the open paths."""
    if path in OPEN_PATHS:
        return None
    if method in READ_METHODS or (method == "POST" and path.endswith("/get-bulk")):
        return Role.READ
    return Role.WRITE


@dataclass(frozen=True, slots=True)
class Decision:
    """How to answer a request, as far as access goes."""

    status: int  # 200: go on; 401, 403, 429: refuse
    code: str = ""
    message: str = ""
    headers: Mapping[str, str] | None = None

    @property
    def allowed(self) -> bool:
        return self.status == 200


ALLOWED = Decision(200)


def decide(required: Role | None, presented: Role | None, *, had_token: bool) -> Decision:
    """The answer for a request needing ``required`` from a client holding ``presented``."""
    if required is None or presented is Role.WRITE:
        return ALLOWED
    if presented is Role.READ and required is Role.READ:
        return ALLOWED
    if presented is Role.READ:
        return Decision(
            403,
            "forbidden",
            "this token may only read",
            {"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope"'},
        )
    challenge = f'Bearer realm="{REALM}"'
    if had_token:
        challenge += ', error="invalid_token"'
    return Decision(
        401,
        "unauthorized",
        "a valid bearer token is required" if had_token else "a bearer token is required",
        {"WWW-Authenticate": challenge},
    )


@dataclass(frozen=True, slots=True)
class _FileState:
    identity: FileIdentity | None
    digests: tuple[bytes, ...]


class TokenFiles:
    """Each role's token digests, from its file, reloaded when the file changes."""

    def __init__(self, files: Mapping[Role, Path]) -> None:
        self.files = dict(files)
        self._state: dict[Role, _FileState] = {}
        for role, path in self.files.items():
            self._state[role] = self._load(role, path)

    @staticmethod
    def _load(role: Role, path: Path) -> _FileState:
        setting = READ_TOKENS_ENV if role is Role.READ else WRITE_TOKENS_ENV
        identity = file_identity(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise TokenFileError(f"{setting}: cannot read {path} ({reason})") from None
        tokens = parse_tokens(text, f"{setting} {path}")
        return _FileState(identity, tuple(digest(token) for token in sorted(tokens)))

    def counts(self) -> dict[str, int]:
        """How many tokens each role has (for the start-up line; never the tokens)."""
        return {role.value: len(state.digests) for role, state in self._state.items()}

    def role_of(self, token: str) -> Role | None:
        """The role a token holds (write wins), compared in constant time over every digest."""
        presented = digest(token)
        matched: dict[Role, bool] = {}
        for role, state in self._state.items():
            hit = False
            for stored in state.digests:
                hit |= hmac.compare_digest(presented, stored)
            matched[role] = hit
        if matched.get(Role.WRITE):
            return Role.WRITE
        return Role.READ if matched.get(Role.READ) else None

    def reload_changed(self) -> list[Role]:
        """Reload every file whose identity changed; returns the roles reloaded. A file that
        fails to load keeps its previous tokens (one error line)."""
        reloaded = []
        for role, path in self.files.items():
            identity = file_identity(path)
            previous = self._state[role]
            if identity == previous.identity:
                continue
            try:
                self._state[role] = self._load(role, path)
            except TokenFileError as exc:
                # Remember the identity so a broken file is reported once, not every second.
                self._state[role] = _FileState(identity, previous.digests)
                log.error("token file not reloaded; the previous tokens stay", reason=str(exc))
                continue
            reloaded.append(role)
            log.info(
                "token file reloaded",
                role=role.value,
                file=str(path),
                tokens=len(self._state[role].digests),
            )
        return reloaded

    async def watch(self, interval_s: float = RELOAD_INTERVAL_S) -> None:
        """Reload changed files every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.reload_changed)


def request_decision(
    access: TokenFiles, method: str, path: str, authorization: str | None
) -> Decision:
    """How to answer a request, as far as its token goes (the per-peer failure limit aside)."""
    required = required_role(method, path)
    if required is None:
        return ALLOWED
    token = bearer_token(authorization)
    presented = None if token is None else access.role_of(token)
    return decide(required, presented, had_token=token is not None)


def server_access(config: ServerConfig) -> TokenFiles | None:
    """The tokens the server asks for, loaded before anything is opened; None when it runs
    open on purpose (``AUTH=none``). ``SettingsError`` (exit 2) when tokens are asked for and
    no file gives any, or a file is unusable."""
    if config.auth is ServerAuth.NONE:
        return None
    files = {
        role: path
        for role, path in (
            (Role.READ, config.read_tokens_file),
            (Role.WRITE, config.write_tokens_file),
        )
        if path is not None
    }
    if not files:
        raise SettingsError(
            f"the server asks for bearer tokens and has none: set {READ_TOKENS_ENV} and/or "
            f"{WRITE_TOKENS_ENV} (files, one token a line), or {ENV_PREFIX}SERVER__AUTH=none to "
            "let every client read and write"
        )
    try:
        return TokenFiles(files)
    except TokenFileError as exc:
        raise SettingsError(str(exc)) from None


class FailureLimiter:
    """Failed authentications per peer, as token buckets: a peer past its burst is refused
    (429) until the bucket refills. Bounded: the least recently seen peers are forgotten."""

    def __init__(
        self,
        *,
        burst: float = FAILURE_BURST,
        rate_per_s: float = FAILURE_RATE_PER_S,
        max_peers: int = MAX_TRACKED_PEERS,
    ) -> None:
        self.burst = burst
        self.rate_per_s = rate_per_s
        self.max_peers = max_peers
        self._peers: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def _tokens(self, peer: str, now: float) -> float:
        tokens, at = self._peers.get(peer, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate_per_s)

    def blocked(self, peer: str, now: float | None = None) -> bool:
        """True when ``peer`` has no failure left to spend."""
        if peer not in self._peers:
            return False
        return self._tokens(peer, time.monotonic() if now is None else now) < 1.0

    def failed(self, peer: str, now: float | None = None) -> None:
        """Count one failed authentication of ``peer``."""
        moment = time.monotonic() if now is None else now
        self._peers[peer] = (self._tokens(peer, moment) - 1.0, moment)
        self._peers.move_to_end(peer)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)


TOO_MANY_FAILURES = Decision(
    429,
    "too_many_auth_failures",
    "too many requests with a missing or wrong token from this address; slow down",
    {"Retry-After": "1"},
)


def describe(files: TokenFiles | None) -> str:
    """The start-up line's account of access control (never a token)."""
    if files is None:
        return "none (SI_SDF__SERVER__AUTH=none: every client may read and write)"
    counts = ", ".join(f"{count} {role}" for role, count in files.counts().items())
    return f"bearer tokens ({counts})"
