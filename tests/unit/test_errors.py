from __future__ import annotations

import ast
import importlib
import re
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import asyncpg
import pytest
from aiobotocore.response import AioReadTimeoutError
from aiohttp.client_reqrep import ConnectionKey
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ProxyConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
    TokenRetrievalError,
)

from layer_cache import errors
from layer_cache.errors import (
    ErrorKind,
    PgLayerError,
    S3LayerError,
    classify_pg_sqlstate,
    classify_s3_error,
    map_credential_refresh_errors,
    map_pg_connect_errors,
    map_pg_errors,
    map_s3_errors,
    untrusted_certificate,
)


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("SlowDown", 503, ErrorKind.THROTTLED),
        ("RequestLimitExceeded", 400, ErrorKind.THROTTLED),
        ("503", None, ErrorKind.THROTTLED),  # HEAD: no body, the code is the status
        (None, 429, ErrorKind.THROTTLED),
        ("InternalError", 500, ErrorKind.TRANSIENT),
        (None, 502, ErrorKind.TRANSIENT),
        ("504", None, ErrorKind.TRANSIENT),
        ("BadDigest", 400, ErrorKind.TRANSIENT),
        ("404", None, ErrorKind.NOT_FOUND),
        ("NoSuchKey", 404, ErrorKind.NOT_FOUND),
        ("NoSuchBucket", 404, ErrorKind.MISSING_BUCKET),
        ("AccessDenied", 403, ErrorKind.ACCESS_DENIED),
        ("403", None, ErrorKind.ACCESS_DENIED),
        ("InvalidAccessKeyId", 403, ErrorKind.INVALID_CREDENTIALS),
        ("SignatureDoesNotMatch", 403, ErrorKind.INVALID_CREDENTIALS),
        ("InvalidArgument", 400, ErrorKind.OTHER),
        (None, None, ErrorKind.OTHER),
    ],
)
def test_s3_errors_are_classified_by_code_then_status(
    code: str | None, status: int | None, kind: ErrorKind
) -> None:
    assert classify_s3_error(code, status) is kind


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("57P01", ErrorKind.TRANSIENT),  # pg_terminate_backend
        ("08006", ErrorKind.TRANSIENT),
        ("08003", ErrorKind.TRANSIENT),
        ("40001", ErrorKind.TRANSIENT),
        ("42P01", ErrorKind.MISSING_TABLE),
        ("42501", ErrorKind.ACCESS_DENIED),
        ("28P01", ErrorKind.INVALID_CREDENTIALS),
        ("3D000", ErrorKind.MISSING_DATABASE),
        ("22001", ErrorKind.OTHER),
        (None, ErrorKind.OTHER),
    ],
)
def test_postgres_errors_are_classified_by_sqlstate(sqlstate: str | None, kind: ErrorKind) -> None:
    assert classify_pg_sqlstate(sqlstate) is kind


def test_only_throttling_transient_and_expired_token_errors_are_retryable() -> None:
    assert {kind for kind in ErrorKind if kind.retryable} == {
        ErrorKind.THROTTLED,
        ErrorKind.TRANSIENT,
        ErrorKind.CREDENTIALS_EXPIRED,
    }


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("ExpiredToken", ErrorKind.CREDENTIALS_EXPIRED),
        ("ExpiredTokenException", ErrorKind.CREDENTIALS_EXPIRED),
        ("TokenRefreshRequired", ErrorKind.CREDENTIALS_EXPIRED),
        ("RequestExpired", ErrorKind.CREDENTIALS_EXPIRED),
        ("InvalidToken", ErrorKind.INVALID_CREDENTIALS),
    ],
)
def test_expired_tokens_are_their_own_kind(code: str, kind: ErrorKind) -> None:
    assert classify_s3_error(code, 400) is kind


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("57014", ErrorKind.TRANSIENT),  # query_canceled: statement_timeout
        ("57P01", ErrorKind.TRANSIENT),  # admin_shutdown
        ("57P02", ErrorKind.TRANSIENT),
        ("57P03", ErrorKind.TRANSIENT),
    ],
)
def test_operator_intervention_sqlstates_are_transient(sqlstate: str, kind: ErrorKind) -> None:
    assert classify_pg_sqlstate(sqlstate) is kind


# --------------------------------------------------------------------------------------------
# The mappers, fed the exceptions the libraries raise (constructed as the libraries do)

URL = "https://s3.us-east-1.amazonaws.com/bucket/key"


def client_error(code: str, status: int, operation: str = "PutObject") -> ClientError:
    """What botocore raises for an S3 error response (its parsed body and metadata)."""
    return ClientError(
        cast(
            Any,
            {
                "Error": {"Code": code, "Message": "a localized message that is never read"},
                "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "REQ"},
            },
        ),
        operation,
    )


def connection_key() -> ConnectionKey:
    return ConnectionKey("s3.example", 443, True, True, None, None, None)


S3_TRANSPORT_FAILURES: list[tuple[str, Callable[[], BaseException]]] = [
    ("HTTPClientError(RuntimeError)", lambda: HTTPClientError(error=RuntimeError("unexpected"))),
    (  # a TLS failure that is not the certificate's (TLS to a plain-HTTP port, a reset)
        "SSLError(ClientConnectorSSLError)",
        lambda: SSLError(
            endpoint_url=URL,
            error=aiohttp.ClientConnectorSSLError(
                connection_key(), ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version")
            ),
        ),
    ),
    (
        "ProxyConnectionError(ClientProxyConnectionError)",
        lambda: ProxyConnectionError(
            proxy_url="http://proxy:3128",
            error=aiohttp.ClientProxyConnectionError(connection_key(), OSError(111, "refused")),
        ),
    ),
    (
        "ReadTimeoutError(ServerTimeoutError)",
        lambda: ReadTimeoutError(endpoint_url=URL, error=aiohttp.ServerTimeoutError("read")),
    ),
    (
        "AioReadTimeoutError(TimeoutError)",
        lambda: AioReadTimeoutError(endpoint_url=URL, error=TimeoutError()),
    ),
    (
        "ConnectTimeoutError(ConnectionTimeoutError)",
        lambda: ConnectTimeoutError(
            endpoint_url=URL, error=aiohttp.ConnectionTimeoutError("connect")
        ),
    ),
    (
        "EndpointConnectionError(ClientConnectorError)",
        lambda: EndpointConnectionError(
            endpoint_url=URL,
            error=aiohttp.ClientConnectorError(connection_key(), OSError(113, "no route")),
        ),
    ),
    (
        "ConnectionClosedError(ServerDisconnectedError)",
        lambda: ConnectionClosedError(endpoint_url=URL, error=aiohttp.ServerDisconnectedError()),
    ),
    (
        "ResponseStreamingError(ClientPayloadError)",
        lambda: ResponseStreamingError(error=aiohttp.ClientPayloadError("not completed")),
    ),
    ("IncompleteReadError", lambda: IncompleteReadError(actual_bytes=10, expected_bytes=20)),
    ("FlexibleChecksumError", lambda: FlexibleChecksumError(error_msg="crc32 mismatch")),
    # aiohttp's own, when they surface unwrapped (a body read mid-stream)
    ("ServerDisconnectedError", lambda: aiohttp.ServerDisconnectedError()),
    ("ClientOSError", lambda: aiohttp.ClientOSError(104, "Connection reset by peer")),
    ("ClientPayloadError", lambda: aiohttp.ClientPayloadError("Response payload incomplete")),
    ("ClientConnectionResetError", lambda: aiohttp.ClientConnectionResetError("lost")),
    ("ConnectionResetError", lambda: ConnectionResetError(104, "Connection reset by peer")),
    ("TimeoutError", lambda: TimeoutError()),
]


@pytest.mark.parametrize(
    ("name", "failure"),
    S3_TRANSPORT_FAILURES,
    ids=[name for name, _ in S3_TRANSPORT_FAILURES],
)
def test_map_s3_errors_makes_every_transport_failure_transient(
    name: str, failure: Callable[[], BaseException]
) -> None:
    with pytest.raises(S3LayerError) as raised, map_s3_errors("PutObject", "bucket", "k/ey"):
        raise failure()
    error = raised.value
    assert error.kind is ErrorKind.TRANSIENT
    assert (error.operation, error.bucket, error.key) == ("PutObject", "bucket", "k/ey")
    assert str(error) == (f"PutObject s3://bucket/k/ey failed: {name} talking to the S3 endpoint")


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("SlowDown", 503, ErrorKind.THROTTLED),
        ("InternalError", 500, ErrorKind.TRANSIENT),
        ("BadDigest", 400, ErrorKind.TRANSIENT),
        ("NoSuchBucket", 404, ErrorKind.MISSING_BUCKET),
        ("404", 404, ErrorKind.NOT_FOUND),  # HEAD: the code is the status
        ("AccessDenied", 403, ErrorKind.ACCESS_DENIED),
        ("InvalidAccessKeyId", 403, ErrorKind.INVALID_CREDENTIALS),
        ("ExpiredToken", 400, ErrorKind.CREDENTIALS_EXPIRED),
        ("TokenRefreshRequired", 400, ErrorKind.CREDENTIALS_EXPIRED),
        ("InvalidArgument", 400, ErrorKind.OTHER),
    ],
)
def test_map_s3_errors_classifies_error_responses_by_code_and_status(
    code: str, status: int, kind: ErrorKind
) -> None:
    with pytest.raises(S3LayerError) as raised, map_s3_errors("HeadObject", "bucket", "key"):
        raise client_error(code, status, "HeadObject")
    error = raised.value
    assert (error.kind, error.code, error.status) == (kind, code, status)
    assert str(error).startswith(f"HeadObject s3://bucket/key failed: {code} ({kind})")
    assert "localized" not in str(error)


def test_an_expired_token_message_says_what_is_refreshed() -> None:
    with pytest.raises(S3LayerError) as raised, map_s3_errors("PutObject", "bucket", "key"):
        raise client_error("ExpiredToken", 400)
    assert str(raised.value) == (
        "PutObject s3://bucket/key failed: ExpiredToken (credentials_expired): the session token"
        " has expired; credentials from the AWS chain (iam_role) are refreshed before each"
        " retry, static credentials cannot be"
    )
    assert raised.value.before_retry is None  # the S3 layer decides what to refresh


@pytest.mark.parametrize(
    "failure",
    [
        NoCredentialsError(),
        PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
        CredentialRetrievalError(provider="container-role", error_msg="503 from the agent"),
        TokenRetrievalError(provider="sso", error_msg="the SSO session expired"),
    ],
    ids=lambda failure: type(failure).__name__,
)
def test_map_s3_errors_makes_missing_credentials_invalid_credentials(
    failure: BaseException,
) -> None:
    with pytest.raises(S3LayerError) as raised, map_s3_errors("ListObjectsV2", "bucket"):
        raise failure
    assert raised.value.kind is ErrorKind.INVALID_CREDENTIALS
    assert str(raised.value) == (
        f"ListObjectsV2 s3://bucket failed: no usable S3 credentials ({type(failure).__name__})"
    )


def test_map_s3_errors_leaves_no_botocore_error_unmapped() -> None:
    with pytest.raises(S3LayerError) as raised, map_s3_errors("PutObject", "bucket", "key"):
        raise ParamValidationError(report="Invalid type for parameter Body")
    assert raised.value.kind is ErrorKind.OTHER
    assert not raised.value.kind.retryable
    assert str(raised.value) == "PutObject s3://bucket/key failed: ParamValidationError"


def test_map_s3_errors_lets_errors_of_other_origins_through() -> None:
    with pytest.raises(KeyError), map_s3_errors("PutObject", "bucket", "key"):
        raise KeyError("a bug, not S3")


@pytest.mark.parametrize(
    "failure",
    [
        CredentialRetrievalError(provider="assume-role", error_msg="STS unreachable"),
        client_error("AccessDenied", 403, "AssumeRoleWithWebIdentity"),
        RuntimeError(
            "Credentials were refreshed, but the refreshed credentials are still expired."
        ),
    ],
    ids=["provider", "sts", "still-expired"],
)
def test_a_failed_credential_refresh_is_invalid_credentials(failure: BaseException) -> None:
    with (
        pytest.raises(S3LayerError) as raised,
        map_credential_refresh_errors("PutObject", "bucket", "key"),
    ):
        raise failure
    assert raised.value.kind is ErrorKind.INVALID_CREDENTIALS
    assert str(raised.value).startswith(
        "PutObject s3://bucket/key failed: the session token has expired and refreshing the"
        f" credentials failed ({type(failure).__name__}"
    )


def pg_error(sqlstate: str, message: str) -> asyncpg.PostgresError:
    """What asyncpg raises for an ErrorResponse: ``PostgresError.new`` picks the subclass."""
    error = asyncpg.PostgresError.new({"C": sqlstate, "M": message, "S": "ERROR", "V": "ERROR"})
    assert isinstance(error, asyncpg.PostgresError)
    return error


@pytest.mark.parametrize(
    ("sqlstate", "error_class", "kind"),
    [
        ("57014", asyncpg.QueryCanceledError, ErrorKind.TRANSIENT),
        ("57P01", asyncpg.AdminShutdownError, ErrorKind.TRANSIENT),
        ("57P03", asyncpg.CannotConnectNowError, ErrorKind.TRANSIENT),
        ("08006", asyncpg.ConnectionFailureError, ErrorKind.TRANSIENT),
        ("53300", asyncpg.TooManyConnectionsError, ErrorKind.TRANSIENT),
        ("40P01", asyncpg.DeadlockDetectedError, ErrorKind.TRANSIENT),
        ("42P01", asyncpg.UndefinedTableError, ErrorKind.MISSING_TABLE),
        ("42501", asyncpg.InsufficientPrivilegeError, ErrorKind.ACCESS_DENIED),
        ("28P01", asyncpg.InvalidPasswordError, ErrorKind.INVALID_CREDENTIALS),
        ("3D000", asyncpg.InvalidCatalogNameError, ErrorKind.MISSING_DATABASE),
        ("22P02", asyncpg.InvalidTextRepresentationError, ErrorKind.OTHER),
    ],
)
def test_map_pg_errors_classifies_server_errors_by_sqlstate(
    sqlstate: str, error_class: type[asyncpg.PostgresError], kind: ErrorKind
) -> None:
    failure = pg_error(sqlstate, "server message")
    assert type(failure) is error_class
    with pytest.raises(PgLayerError) as raised, map_pg_errors("reading cas key k"):
        raise failure
    assert (raised.value.kind, raised.value.sqlstate) == (kind, sqlstate)
    assert str(raised.value) == (
        f"reading cas key k failed: server message (SQLSTATE {sqlstate}, {kind})"
    )


@pytest.mark.parametrize("sqlstate", ["26000", "42P05"])
def test_prepared_statement_errors_say_how_to_run_behind_pgbouncer(sqlstate: str) -> None:
    failure = pg_error(sqlstate, 'prepared statement "__asyncpg_stmt_1__" does not exist')
    with pytest.raises(PgLayerError) as raised, map_pg_errors("reading 40 values of cas"):
        raise failure
    assert raised.value.kind is ErrorKind.OTHER
    assert str(raised.value).endswith(
        f"(SQLSTATE {sqlstate}, other); behind PgBouncer (or another pooler) in transaction"
        " mode, set SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__STATEMENT_CACHE_SIZE=0"
    )


def test_a_connection_closed_mid_operation_keeps_asyncpgs_words() -> None:
    # asyncpg raises this one itself, with its text as the argument and no server fields.
    failure = asyncpg.ConnectionDoesNotExistError(
        "connection was closed in the middle of operation"
    )
    with pytest.raises(PgLayerError) as raised, map_pg_errors("reading cas key k"):
        raise failure
    assert raised.value.kind is ErrorKind.TRANSIENT
    assert str(raised.value) == (
        "reading cas key k failed: connection was closed in the middle of operation"
        " (SQLSTATE 08003, transient)"
    )


PG_CONNECTION_LOSSES: list[BaseException] = [
    asyncpg.InterfaceError("cannot call Connection.fetch(): connection is closed"),
    asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress"),
    asyncpg.exceptions.ProtocolError("unexpected message"),
    ConnectionResetError(104, "Connection reset by peer"),
    ConnectionRefusedError(111, "Connection refused"),
    BrokenPipeError(32, "Broken pipe"),
    TimeoutError(),
]


@pytest.mark.parametrize(
    "failure", PG_CONNECTION_LOSSES, ids=lambda failure: type(failure).__name__
)
def test_map_pg_errors_makes_a_lost_connection_transient(failure: BaseException) -> None:
    for mapper in (map_pg_errors, map_pg_connect_errors):
        with pytest.raises(PgLayerError) as raised, mapper("listing rows of cas"):
            raise failure
        assert raised.value.kind is ErrorKind.TRANSIENT
        assert str(raised.value).startswith(f"listing rows of cas failed: {type(failure).__name__}")


@pytest.mark.parametrize(
    "failure",
    [
        asyncpg.exceptions.ClientConfigurationError("sslmode is invalid"),
        asyncpg.exceptions.UnsupportedClientFeatureError("no"),
        asyncpg.exceptions.UnsupportedServerFeatureError("no"),
    ],
    ids=lambda failure: type(failure).__name__,
)
def test_map_pg_errors_does_not_call_a_configuration_error_a_lost_connection(
    failure: BaseException,
) -> None:
    with pytest.raises(PgLayerError) as raised, map_pg_errors("connecting"):
        raise failure
    assert raised.value.kind is ErrorKind.OTHER


SOCKET_ERRORS: list[OSError] = [
    OSError(113, "No route to host"),
    socket.gaierror(-2, "Name or service not known"),
    ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
]


@pytest.mark.parametrize("failure", SOCKET_ERRORS, ids=lambda failure: type(failure).__name__)
def test_socket_errors_are_transient_only_while_connecting(failure: OSError) -> None:
    with pytest.raises(PgLayerError) as raised, map_pg_connect_errors("connecting to Postgres"):
        raise failure
    assert raised.value.kind is ErrorKind.TRANSIENT
    # Around a query an OSError is no answer from the database: it is not relabelled.
    with pytest.raises(type(failure)) as unmapped, map_pg_errors("reading cas key k"):
        raise failure
    assert unmapped.value is failure


def test_map_pg_errors_lets_a_file_error_through() -> None:
    with pytest.raises(FileNotFoundError), map_pg_errors("reading cas key k"):
        raise FileNotFoundError(2, "No such file or directory", "/etc/si/pg-ca.crt")


# --------------------------------------------------------------------------------------------
# A certificate the client refused: found by type however it was wrapped; never retried


def refused_certificate(reason: str = "unable to get local issuer certificate") -> ssl.SSLError:
    """An ``ssl.SSLCertVerificationError`` as OpenSSL raises it, with its reason."""
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {reason}")
    error.verify_message = reason
    error.verify_code = 20
    return error


def aiohttp_refusal(reason: str = "unable to get local issuer certificate") -> Exception:
    """aiohttp's wrapping, raised ``from`` the ssl error as aiohttp's connector does."""
    cause = refused_certificate(reason)
    wrapped = aiohttp.ClientConnectorCertificateError(connection_key(), cause)
    wrapped.__cause__ = cause
    return wrapped


def raised_inside_except(inner: BaseException, outer: Callable[[], BaseException]) -> BaseException:
    """``outer()`` raised while handling ``inner``: linked by ``__context__`` alone."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer()  # noqa: B904 - implicit chaining: linked by __context__ only
    except BaseException as exc:
        return exc
    raise AssertionError("unreachable")


CERTIFICATE_FAILURES: list[tuple[str, Callable[[], BaseException]]] = [
    ("bare", lambda: refused_certificate()),
    ("aiohttp", aiohttp_refusal),
    (
        "botocore SSLError(error=aiohttp)",
        lambda: SSLError(endpoint_url=URL, error=aiohttp_refusal()),
    ),
    (
        "botocore EndpointConnectionError(error=ssl)",
        lambda: EndpointConnectionError(endpoint_url=URL, error=refused_certificate()),
    ),
    (
        "HTTPClientError raised while handling it",
        lambda: raised_inside_except(aiohttp_refusal(), lambda: HTTPClientError(error=None)),
    ),
]


@pytest.mark.parametrize(
    "failure",
    [failure for _, failure in CERTIFICATE_FAILURES],
    ids=[name for name, _ in CERTIFICATE_FAILURES],
)
def test_a_refused_certificate_is_found_however_the_transport_wrapped_it(
    failure: Callable[[], BaseException],
) -> None:
    found = untrusted_certificate(failure())
    assert isinstance(found, ssl.SSLCertVerificationError)
    assert found.verify_message == "unable to get local issuer certificate"


@pytest.mark.parametrize(
    "failure",
    [
        lambda: SSLError(
            endpoint_url=URL, error=aiohttp.ClientSSLError(connection_key(), OSError())
        ),
        lambda: EndpointConnectionError(endpoint_url=URL, error=ConnectionRefusedError(111, "no")),
        lambda: ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
    ],
    ids=["ssl-not-certificate", "refused", "wrong-version"],
)
def test_other_connection_failures_are_no_certificate_refusal(
    failure: Callable[[], BaseException],
) -> None:
    assert untrusted_certificate(failure()) is None


@pytest.mark.parametrize(
    "failure",
    [failure for _, failure in CERTIFICATE_FAILURES],
    ids=[name for name, _ in CERTIFICATE_FAILURES],
)
def test_map_s3_errors_makes_a_refused_certificate_final_with_its_reason(
    failure: Callable[[], BaseException],
) -> None:
    with pytest.raises(S3LayerError) as raised, map_s3_errors("HeadBucket", "bucket"):
        raise failure()
    error = raised.value
    assert error.kind is ErrorKind.UNTRUSTED_CERTIFICATE
    assert not error.kind.retryable
    assert error.detail == "unable to get local issuer certificate"
    assert str(error) == (
        "HeadBucket s3://bucket failed: the S3 endpoint's TLS certificate is not trusted "
        "(unable to get local issuer certificate)"
    )


def test_a_refused_postgres_certificate_is_final_with_its_reason() -> None:
    reason = "Hostname mismatch, certificate is not valid for 'db.internal'."
    with pytest.raises(PgLayerError) as raised, map_pg_connect_errors("connecting to Postgres"):
        raise refused_certificate(reason)
    assert raised.value.kind is ErrorKind.UNTRUSTED_CERTIFICATE
    assert str(raised.value) == (
        f"connecting to Postgres failed: the server's TLS certificate is not trusted ({reason})"
    )


# --------------------------------------------------------------------------------------------
# One tree, in one module, drawn in its docstring

REPO = Path(__file__).resolve().parents[2]
PRODUCT_PACKAGES = (
    "layer_cache",
    "services",
    "migrations_mode",
    "layer_cache_server",
    "si_layer_cache",
)
ERRORS_MODULE = REPO / "layer_cache" / "errors.py"
# A line of the docstring's tree: four spaces, two more per level, the class, its description.
TREE_LINE = re.compile(r"^    (?P<indent>(?:  )*)(?P<name>[A-Z]\w*)  +\S")


def _resolve(dotted: str) -> object:
    """What a dotted name stands for: its longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise LookupError(dotted)


def exception_classes(path: Path) -> set[str]:
    """The exception classes a module defines, read from its source: each base is resolved
    through the module's own imports (or builtins), a base defined in the module by its bases."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.partition(".")[0]
                imported[local] = alias.name if alias.asname else local
    classes = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}

    def is_exception(base: ast.expr) -> bool:
        if not isinstance(base, ast.Name | ast.Attribute):  # Generic[T], a call: not a class
            return False
        head, _, rest = ast.unparse(base).partition(".")
        if head in classes and not rest:
            return any(is_exception(grand) for grand in classes[head].bases)
        found = _resolve(imported.get(head, f"builtins.{head}") + (f".{rest}" if rest else ""))
        return isinstance(found, type) and issubclass(found, BaseException)

    return {name for name, node in classes.items() if any(map(is_exception, node.bases))}


def module_exceptions() -> dict[str, type[BaseException]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == errors.__name__
    }


def documented_tree(docstring: str) -> dict[str, str | None]:
    """Each class the docstring's tree names, and its parent in the tree (None: a root)."""
    parents: dict[str, str | None] = {}
    path: list[str] = []
    for line in docstring.splitlines():
        match = TREE_LINE.match(line)
        if match is None:
            continue
        depth = len(match["indent"]) // 2
        assert depth <= len(path), f"{line!r} is indented past its parent"
        del path[depth:]
        parents[match["name"]] = path[-1] if path else None
        path.append(match["name"])
    return parents


def test_every_exception_class_of_the_product_is_defined_in_the_errors_module() -> None:
    defined = {
        (path.relative_to(REPO).as_posix(), name)
        for package in PRODUCT_PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        for name in exception_classes(path)
    }
    assert {entry for entry in defined if entry[0] != "layer_cache/errors.py"} == set()
    # The scan finds what the module holds (so an empty scan cannot pass the line above).
    assert exception_classes(ERRORS_MODULE) == set(module_exceptions())


def test_the_errors_docstring_draws_the_module_tree_with_each_class_real_parent() -> None:
    classes = module_exceptions()
    assert all(len(cls.__bases__) == 1 for cls in classes.values())
    parents = {
        name: cls.__base__.__name__ if cls.__base__.__module__ == errors.__name__ else None
        for name, cls in classes.items()
        if cls.__base__ is not None
    }
    assert errors.__doc__ is not None
    assert documented_tree(errors.__doc__) == parents
    # One tree: a single root, and it is a plain Exception.
    assert [name for name, parent in parents.items() if parent is None] == ["LayerCacheError"]
    assert errors.LayerCacheError.__bases__ == (Exception,)
