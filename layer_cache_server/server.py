"""The layer cache server: an aiohttp HTTP API over the persister of the configured mode.

Routes serve the eight backfillable cache types (raw bytes in and out, JSON errors with stable
codes); keys must match ``[0-9A-Za-z]{1,128}``, every upstream key form and nothing that could
change an object key's path. ``/readyz`` probes each backend the mode uses, bounded by
``readiness_timeout_secs``. Shutdown, on the first SIGTERM/SIGINT (``capture_signals`` sets the
stop event), within one grace period: ``/readyz`` turns 503 and the listener closes; requests in
flight run to completion (one arriving on an open keep-alive connection is answered with
``Connection: close``); idle connections close, and what still runs at the end is cancelled with
``CANCEL_WAIT_S`` to unwind (a cancelled PUT may be on some targets only, which a retry
completes); the write queue and the Postgres retry queue drain with the time left; then the
caller leaves the services context. Metrics: upstream's layer cache series
(``layer_cache.persister_metrics``, ``layer_cache.write_queue``, ``layer_cache.cache_tier``), and
the server's own per request: ``layer_cache_server.requests`` (a counter) and
``layer_cache_server.request_duration_ms`` (a histogram), both ``{method, route, status}``. The
API, settings and stopping as operators see them: ``docs/server.md``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from layer_cache.cache_tier import CacheTier, TieredPersister
from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CACHE_SPECS, CacheType
from layer_cache.disk_tier import DiskTier
from layer_cache.errors import ApiError, ListenError, SettingsError, StorageError
from layer_cache.instruments import ms_histogram
from layer_cache.persister import ROUTES, Backend, CachePersister, PgStore, S3Store, Store
from layer_cache.persister_metrics import PersisterMetrics
from layer_cache.retry import Backoff
from layer_cache.schema import check_layer_db_schema
from layer_cache.write_queue import (
    PG_RETRY_QUEUE,
    S3_WRITE_QUEUE,
    QueueBudget,
    QueueKind,
    RequestsInFlight,
    WriteBehind,
)
from layer_cache_server.auth import (
    TOO_MANY_FAILURES,
    FailureLimiter,
    TokenFiles,
    request_decision,
    server_access,
)
from layer_cache_server.auth import describe as describe_access
from layer_cache_server.tls import ServerTls, server_tls
from services.cache_sizing import TierPlan, plan_tier
from services.context import ServicesContext, open_services_context
from services.settings import ENV_PREFIX, ServerConfig, Settings
from services.signals import StopRequest

log = structlog.get_logger(__name__)

SOCKET_ADDR_ENV = f"{ENV_PREFIX}SOCKET_ADDR"
KEY_PATTERN = re.compile(r"[0-9A-Za-z]{1,128}")
SERVED_CACHE_TYPES: tuple[CacheType, ...] = BACKFILLABLE_CACHE_TYPES
OCTET_STREAM = "application/octet-stream"
CANCEL_WAIT_S = 0.25
"""After the grace period: how long a cancelled request gets to unwind."""
REQUESTS_METRIC = "layer_cache_server.requests"
REQUEST_DURATION_METRIC = "layer_cache_server.request_duration_ms"
# Refusals answered before the body was read: the connection is closed rather than drained.
_CLOSING_STATUSES = frozenset({401, 403, 429})


def parse_socket_addr(text: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` → (host, port); port 0 asks for a free one."""
    host, separator, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not separator or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise SettingsError(
            f"invalid {SOCKET_ADDR_ENV} (--socket-addr): {text!r} is not host:port "
            "(e.g. 0.0.0.0:5156, [::]:5156, 127.0.0.1:0)"
        )
    return host, int(port_text)


def error_response(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The JSON error body every failure uses."""
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


_HTTP_ERROR_CODES: Mapping[int, str] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}

_STORE_FACTORIES: Mapping[Backend, Callable[[ServicesContext, CacheType], Store]] = {
    Backend.POSTGRES: lambda context, cache_type: PgStore(context.pg_layer(cache_type)),
    Backend.S3: lambda context, cache_type: S3Store(context.s3_layer(cache_type)),
}


class _NoWriteQueue:
    """PostgresOnly and S3Only: no deferred target and no second read backend to fill."""

    async def enqueue(self, store: Store, key: str, value: bytes) -> None:
        raise RuntimeError(f"{store.backend} is not a deferred target in this mode")

    def offer(self, store: Store, key: str, value: bytes) -> None:
        raise RuntimeError(f"{store.backend} is not filled on read in this mode")


_NO_QUEUE = _NoWriteQueue()


class LayerCacheServer:
    """The HTTP application and its persisters; ``run`` serves until asked to stop."""

    def __init__(
        self,
        context: ServicesContext,
        config: ServerConfig,
        *,
        access: TokenFiles | None,
        tls: ServerTls | None = None,
        tier: CacheTier | None = None,
    ) -> None:
        """``access`` None serves every client (``AUTH=none``, on purpose); ``tls`` None is
        plain HTTP. Both come from ``server_access`` / ``server_tls`` before anything opens."""
        self.context = context
        self.config = config
        self.access = access
        self.tls = tls
        self.tier = CacheTier(0) if tier is None else tier  # none: reads go to the backends
        self.auth_failures = FailureLimiter()
        meter = context.telemetry.meter
        self._requests = meter.create_counter(
            REQUESTS_METRIC, description="HTTP requests answered, by method, route and status"
        )
        self._request_duration = ms_histogram(
            meter,
            REQUEST_DURATION_METRIC,
            "time from a request's arrival to its answer sent, by method, route and status",
        )
        metrics = PersisterMetrics(meter)
        self.mode = context.settings.layer_db_config.persister_mode
        self.route = ROUTES[self.mode]
        self.requests = RequestsInFlight()
        """The requests being answered: shutdown waits for them, the queues yield to them."""
        stores = {
            cache_type: {b: _STORE_FACTORIES[b](context, cache_type) for b in self.route.backends}
            for cache_type in SERVED_CACHE_TYPES
        }
        budget = QueueBudget(
            max_attempts=config.write_queue_max_attempts,
            max_age_s=config.write_queue_max_age_secs,
            backoff=Backoff(
                base_delay_s=config.write_queue_base_delay_secs,
                max_delay_s=config.write_queue_max_delay_secs,
            ),
        )

        def queue(kind: QueueKind, workers: int) -> WriteBehind:
            targets = {ct: stores[ct][kind.backend] for ct in SERVED_CACHE_TYPES}
            return WriteBehind(
                config.write_queue_dir,
                targets,
                context.telemetry.meter,
                workers=workers,
                budget=budget,
                kind=kind,
                requests=self.requests,
                yield_lag_s=config.write_queue_yield_lag_secs,
            )

        # DualWrite, S3Primary: S3 through the durable write queue.
        self.write_back: WriteBehind | None = None
        if self.route.deferred:
            self.write_back = queue(S3_WRITE_QUEUE, config.write_queue_workers)
        # Postgres rows whose INSERT failed after their S3 PUT was queued (DualWrite, S3Primary);
        # a PostgresOnly server drains what such a server left behind, and queues nothing.
        self.retry_later: WriteBehind | None = None
        leftover = (config.write_queue_dir / PG_RETRY_QUEUE.file_name).exists()
        if Backend.POSTGRES in self.route.writes and (self.route.deferred or leftover):
            self.retry_later = queue(PG_RETRY_QUEUE, config.retry_queue_workers)
        self.persisters: dict[CacheType, TieredPersister] = {
            cache_type: TieredPersister(
                CachePersister(
                    self.route,
                    stores[cache_type],
                    self.write_back or _NO_QUEUE,
                    retry_later=self.retry_later if self.route.deferred else None,
                    metrics=metrics,
                ),
                self.tier,
                cache_type,
            )
            for cache_type in SERVED_CACHE_TYPES
        }
        # Readiness asks each backend once, through the first served cache's store.
        first = stores[SERVED_CACHE_TYPES[0]]
        self._probes = {backend: first[backend] for backend in sorted(self.route.backends)}
        self._ready = False
        self._stopping = False
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.max_body_bytes, middlewares=[self._middleware]
        )
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_post("/v1/{cache_type}/get-bulk", self._get_bulk)
        app.router.add_get("/v1/{cache_type}/{key}", self._get, allow_head=False)
        app.router.add_route("HEAD", "/v1/{cache_type}/{key}", self._head)
        app.router.add_put("/v1/{cache_type}/{key}", self._put)
        app.router.add_delete("/v1/{cache_type}/{key}", self._evict)
        return app

    # ---------------------------------------------------------------------------------------
    # Serving and shutting down

    async def run(
        self,
        stop: StopRequest,
        *,
        socket_addr: str,
        on_listening: Callable[[str, int], None] | None = None,
    ) -> None:
        """Listen on ``socket_addr`` until ``stop`` is set, then shut down gracefully."""
        host, port = parse_socket_addr(socket_addr)
        grace = self.config.grace_period_secs
        # aiohttp's own graceful shutdown stops reading request bodies at once (aio-libs/aiohttp
        # #2298), which would fail every upload in flight: this server waits for its requests
        # itself and leaves aiohttp only the idle connections and the cancelling.
        runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, shutdown_timeout=CANCEL_WAIT_S
        )
        await runner.setup()
        loop = asyncio.get_running_loop()
        try:
            self.tier.start()
        except BaseException:
            await runner.cleanup()
            raise
        queues = [queue for queue in (self.write_back, self.retry_later) if queue is not None]
        for queue in queues:
            queue.start()
        watchers = [
            asyncio.create_task(watched.watch())
            for watched in (self.access, self.tls)
            if watched is not None
        ]
        try:
            try:
                ssl_context = None if self.tls is None else self.tls.context
                await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
            except OSError as exc:
                raise ListenError(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                    f"choose another {SOCKET_ADDR_ENV} (--socket-addr)"
                ) from exc
            bound_host, bound_port = runner.addresses[0][:2]
            self._ready = True
            log.info(
                "layer cache server listening",
                host=bound_host,
                port=bound_port,
                persister_mode=self.mode.value,
                cache_types=[cache_type.value for cache_type in SERVED_CACHE_TYPES],
                auth=describe_access(self.access),
                transport="http" if self.tls is None else self.tls.mode,
                metrics=self.context.telemetry.destination,
            )
            if on_listening is not None:
                on_listening(bound_host, bound_port)
            await stop.event.wait()
            log.info(
                "layer cache server shutting down",
                signal=stop.signal.name if stop.signal else None,
                in_flight_requests=self.requests.count,
                queued_s3_writes=await self.write_back.depth() if self.write_back else 0,
                queued_postgres_retries=await self.retry_later.depth() if self.retry_later else 0,
                grace_period_s=grace,
            )
        finally:
            for watcher in watchers:
                watcher.cancel()
            self._ready = False
            self._stopping = True
            deadline = loop.time() + grace
            for site in list(runner.sites):
                await site.stop()  # no new connections
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self.requests.idle.wait()
            cancelled = self.requests.count
            await runner.cleanup()  # close idle connections, cancel what still runs
            left = await asyncio.gather(*(q.drain(deadline - loop.time()) for q in queues))
            remaining = dict(zip([q.kind.backend for q in queues], left, strict=True))
            await self.tier.close()
            log.info(
                "layer cache server stopped",
                cancelled_requests=cancelled,
                queued_s3_writes_left=remaining.get(Backend.S3, 0),
                queued_postgres_retries_left=remaining.get(Backend.POSTGRES, 0),
            )

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.started()
        started = time.perf_counter()
        try:
            response = await self._answer(request, handler)
            if self._stopping or response.status in _CLOSING_STATUSES:
                # Answer, then close: the connection takes no more (shutting down), or the
                # request was refused before its body was read (not worth draining).
                response.force_close()
            # Sent here, so a request stays "in flight" (and shutdown waits) until its body is
            # written; aiohttp sees a prepared response and only finishes it.
            await response.prepare(request)
            await response.write_eof()
        finally:
            self.requests.finished()
        duration_ms = (time.perf_counter() - started) * 1000
        route = request.match_info.route.resource
        attributes = {
            "method": request.method,
            "route": route.canonical if route is not None else "unmatched",
            "status": str(response.status),
        }
        self._requests.add(1, attributes)
        self._request_duration.record(duration_ms, attributes)
        log.debug(
            "request",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round(duration_ms, 3),
        )
        return response

    def _authorize(self, request: web.Request) -> None:
        """Raise the refusal of a request its token does not allow (``layer_cache_server.auth``);
        never reads the body, never logs a token."""
        if self.access is None:
            return
        authorization = request.headers.get("Authorization")
        refusal = request_decision(self.access, request.method, request.path, authorization)
        if refusal.allowed:
            return
        if refusal.status == 401:
            # A valid token is never held back; a peer that keeps failing is answered at once,
            # its connection closed, until it slows down (other clients behind the same
            # address, e.g. a NAT, still get in with their tokens).
            peer = request.remote or "unknown"
            if self.auth_failures.blocked(peer):
                refusal = TOO_MANY_FAILURES
            self.auth_failures.failed(peer)
        raise ApiError(refusal.status, refusal.code, refusal.message, headers=refusal.headers)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            self._authorize(request)
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, headers=exc.headers)
        except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, body too big
            if exc.status == web.HTTPRequestEntityTooLarge.status_code:
                message = f"request body exceeds {self.config.max_body_bytes} bytes"
            else:
                message = exc.reason
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            code = _HTTP_ERROR_CODES.get(exc.status, "http_error")
            return error_response(exc.status, code, message, headers=allow)
        except StorageError as exc:
            log.warning(
                "storage call failed",
                method=request.method,
                path=request.path,
                error_class=exc.kind.value,
                cause=str(exc),
            )
            if exc.kind.retryable:
                return error_response(
                    503, "storage_unavailable", str(exc), headers={"Retry-After": "1"}
                )
            return error_response(500, "storage_error", str(exc))
        except Exception:
            log.exception("request failed", method=request.method, path=request.path)
            return error_response(500, "internal_error", "internal error; see the server log")

    # ---------------------------------------------------------------------------------------
    # Handlers

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        if not self._ready:
            raise ApiError(503, "not_ready", "the server is starting or shutting down")
        problems = await asyncio.gather(*(self._probe(store) for store in self._probes.values()))
        checks = {
            backend.value: problem or "ok"
            for backend, problem in zip(self._probes, problems, strict=True)
        }
        if any(
            problem is not None and backend in self.route.required
            for backend, problem in zip(self._probes, problems, strict=True)
        ):
            failing = ", ".join(name for name, state in checks.items() if state != "ok")
            return web.json_response(
                {
                    "error": {"code": "not_ready", "message": f"backend not answering: {failing}"},
                    "checks": checks,
                },
                status=503,
            )
        return web.json_response({"status": "ready", "checks": checks})

    async def _probe(self, store: Store) -> str | None:
        try:
            async with asyncio.timeout(self.config.readiness_timeout_secs):
                await store.check()
        except StorageError as exc:
            return f"{exc.kind.value}: {exc}"
        except TimeoutError:
            return f"no answer within {self.config.readiness_timeout_secs} s"
        return None

    async def _get(self, request: web.Request) -> web.Response:
        persister, key = self._target(request)
        value = await persister.get(key)
        if value is None:
            _not_found(request, key)
        return web.Response(body=value, content_type=OCTET_STREAM)

    async def _head(self, request: web.Request) -> web.Response:
        persister, key = self._target(request)
        size = await persister.size(key)
        if size is None:
            _not_found(request, key)
        # A body-less response keeps an explicit Content-Length: the size of what GET returns.
        return web.Response(content_type=OCTET_STREAM, headers={"Content-Length": str(size)})

    async def _put(self, request: web.Request) -> web.Response:
        persister, key = self._target(request)
        self._check_declared_length(request)
        value = await request.read()
        created = await persister.put(key, value)
        return web.Response(status=201 if created else 200)

    async def _evict(self, request: web.Request) -> web.Response:
        persister, key = self._target(request)
        if not CACHE_SPECS[persister.cache_type].evictable:
            raise ApiError(
                405,
                "method_not_allowed",
                f"{persister.cache_type} values are never evicted (upstream has no evict for "
                "them: they are shared by content)",
            )
        await persister.evict(key)
        return web.Response(status=204)

    async def _get_bulk(self, request: web.Request) -> web.Response:
        persister = self._persister(request)
        self._check_declared_length(request)
        keys = self._bulk_keys(await request.read())
        found = await persister.get_many(keys)
        return web.json_response(
            {
                "values": {
                    key: base64.b64encode(value).decode("ascii") for key, value in found.items()
                },
                "missing": [key for key in keys if key not in found],
            }
        )

    # ---------------------------------------------------------------------------------------
    # Input checks

    def _persister(self, request: web.Request) -> TieredPersister:
        name = request.match_info["cache_type"]
        try:
            cache_type = CacheType(name)
        except ValueError:
            raise ApiError(
                404,
                "unknown_cache_type",
                f"unknown cache type {name!r}; served: {', '.join(SERVED_CACHE_TYPES)}",
            ) from None
        if cache_type not in self.persisters:
            raise ApiError(
                404,
                "unknown_cache_type",
                f"cache type {name!r} ({CACHE_SPECS[cache_type].table}) is not served: func "
                "runs are moving out of the layer cache",
            )
        return self.persisters[cache_type]

    def _target(self, request: web.Request) -> tuple[TieredPersister, str]:
        persister = self._persister(request)
        key = request.match_info["key"]
        _check_key(key)
        return persister, key

    def _check_declared_length(self, request: web.Request) -> None:
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            raise ApiError(
                413, "body_too_large", f"request body exceeds {self.config.max_body_bytes} bytes"
            )

    def _bulk_keys(self, body: bytes) -> list[str]:
        try:
            document: Any = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ApiError(400, "malformed_body", "the body is not JSON") from None
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise ApiError(
                400, "malformed_body", 'the body must be {"keys": [...]} with string keys'
            )
        if len(keys) > self.config.max_bulk_keys:
            raise ApiError(
                400,
                "too_many_keys",
                f"{len(keys)} keys asked for; at most {self.config.max_bulk_keys} per request",
            )
        for key in keys:
            _check_key(key)
        return list(dict.fromkeys(keys))


def _check_key(key: str) -> None:
    if KEY_PATTERN.fullmatch(key) is None:
        raise ApiError(
            400,
            "malformed_key",
            f"malformed key {key[:140]!r}: keys are 1 to 128 ASCII letters and digits",
        )


def _not_found(request: web.Request, key: str) -> NoReturn:
    raise ApiError(404, "not_found", f"no {request.match_info['cache_type']} value for key {key}")


async def serve_layer_cache(
    settings: Settings,
    config: ServerConfig,
    stop: StopRequest,
    *,
    check_schema_first: bool,
    on_listening: Callable[[str, int], None] | None = None,
) -> None:
    """Open the services, optionally check the layer-db schema (``SchemaError`` when it is not
    in place; never DDL), serve until ``stop``."""
    parse_socket_addr(settings.socket_addr)  # refuse a bad address before connecting
    access = server_access(config)  # tokens and TLS files too: exit 2 before anything opens
    tls = server_tls(config)
    async with open_services_context(settings) as context:
        if check_schema_first:
            tables = [CACHE_SPECS[cache_type].table for cache_type in SERVED_CACHE_TYPES]
            await check_layer_db_schema(context.pg_pool, tables)
            log.info(
                "layer-db schema in place", dbname=settings.layer_db_config.pg_pool_config.dbname
            )
        if stop.event.is_set():
            return
        plan = plan_tier(settings)
        tier = build_cache_tier(plan, config, context)
        server = LayerCacheServer(context, config, access=access, tls=tls, tier=tier)
        await server.run(stop, socket_addr=settings.socket_addr, on_listening=on_listening)


def build_cache_tier(plan: TierPlan, config: ServerConfig, context: ServicesContext) -> CacheTier:
    """The cache tier the plan sizes (nothing opened yet: ``CacheTier.start`` does), logged."""
    cache = context.settings.layer_db_config.cache_config
    disk = None
    if plan.disk_path is not None and plan.disk_bytes > 0:
        disk = DiskTier(
            plan.disk_path,
            plan.disk_bytes,
            policy=config.cache_eviction_policy,
            min_entry_bytes=plan.disk_min_entry_bytes,
            reserve_free_bytes=plan.disk_reserve_free_bytes,
            admission_bytes_per_s=cache.disk_admission_rate_limit or None,
            buffer_bytes=cache.disk_buffer_size,
        )
    log.info(
        "cache tier sized",
        memory_bytes=plan.memory_bytes,
        memory_source=plan.memory_source,
        disk_bytes=plan.disk_bytes,
        disk_source=plan.disk_source,
        disk_path=None if disk is None else str(plan.disk_path),
        eviction_policy=config.cache_eviction_policy.value,
        max_entry_percent=config.cache_max_entry_percent,
    )
    return CacheTier(
        plan.memory_bytes,
        policy=config.cache_eviction_policy,
        max_entry_percent=config.cache_max_entry_percent,
        disk=disk,
        meter=context.telemetry.meter,
    )
