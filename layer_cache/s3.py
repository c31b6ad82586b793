"""S3Layer: HEAD/GET/PUT/LIST for one cache's bucket over a shared aioboto3 client.

The layer owns the naming (bucket and object key from the registry and ``keys``) so callers speak
in row keys. Every call goes through ``map_s3_errors`` (in ``_s3_call``, which also gives an
expired token's error the credential refresh to run before a retry); no botocore type leaves this
module. The client itself is opened and closed by the services context, never here.

Every PUT carries ``Content-MD5``: a server that verifies it (AWS, MinIO) refuses a damaged body
(``BadDigest``). Not every S3-compatible server does (moto and s3rver accept any digest), so the
PUT's ``ETag`` is checked too: for a single-part upload it is the hex MD5 of the stored bytes, and
a mismatch is raised as a transient ``BadDigest`` so the upload is retried. Objects stored with
SSE-KMS, DSSE-KMS or SSE-C have 32-hex ETags that are *not* the MD5 (``put_etag_is_md5`` reads
that from the PUT's answer): their ETags are not judged, and S3 has checked ``Content-MD5``.

``put_if_absent`` (the live write path) never deletes: an ETag that contradicts the body is only
a reason to read the object and, if its bytes differ, write it again (a server that ignores
``If-None-Match`` may have overwritten an object that existed, in ``S3Only`` the only copy; a
repair that fails is tried again on the key's next write rather than trusting its 412). A
server without conditional writes (501 ``NotImplemented``, as VersityGW before its 2025-09
release answers) switches the client to unconditional PUTs, upstream's only kind, once
(``ConditionalPuts``, one ``warning``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiobotocore.credentials import AioRefreshableCredentials

from layer_cache.cache_types import CacheSpec
from layer_cache.errors import (
    ErrorKind,
    S3LayerError,
    map_credential_refresh_errors,
    map_s3_errors,
)
from layer_cache.keys import object_key

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


log = structlog.get_logger(__name__)

_PRECONDITION_FAILED = 412
_NOT_IMPLEMENTED = 501


_PLAIN_MD5_ETAG = re.compile(r"[0-9a-f]{32}")

# x-amz-server-side-encryption values whose objects' ETags are not the MD5 of the body.
_KMS_ENCRYPTIONS = frozenset({"aws:kms", "aws:kms:dsse"})


def put_etag_is_md5(response: Mapping[str, Any]) -> bool:
    """Whether a PutObject answer's ETag is the MD5 of the body, read from the answer itself.

    It is not for objects encrypted with a KMS key (``ServerSideEncryption`` ``aws:kms`` or
    ``aws:kms:dsse``) or a customer key (``SSECustomerAlgorithm`` present): S3 documents their
    ETags as not an MD5 digest of the object data. SSE-S3 (``AES256``) and unencrypted objects
    keep MD5 ETags.
    """
    if response.get("SSECustomerAlgorithm"):
        return False
    return response.get("ServerSideEncryption") not in _KMS_ENCRYPTIONS


class BodyDigest:
    """A body's MD5, computed once: the ``Content-MD5`` header and the expected ETag."""

    __slots__ = ("digest",)

    def __init__(self, body: bytes) -> None:
        self.digest = hashlib.md5(body, usedforsecurity=False).digest()

    @property
    def content_md5(self) -> str:
        """Base64, as ``Content-MD5`` wants it."""
        return base64.b64encode(self.digest).decode("ascii")

    def contradicted_by(self, etag: str | None) -> bool:
        """True when an ETag is a plain MD5 and not this one (other ETags are not judged)."""
        if etag is None:
            return False
        value = etag.strip('"').lower()
        return bool(_PLAIN_MD5_ETAG.fullmatch(value)) and value != self.digest.hex()

    def contradicted_by_put(self, response: Mapping[str, Any]) -> bool:
        """True when a PutObject answer shows a stored body other than this one: its ETag is
        an MD5 (``put_etag_is_md5``) and contradicts this digest."""
        return put_etag_is_md5(response) and self.contradicted_by(response.get("ETag"))


@dataclass(frozen=True, slots=True)
class StoredObject:
    """What S3 says of an object without reading it: its size and its ETag (as S3 sends it,
    quotes stripped, lower case), from a listing or a HEAD."""

    size: int
    etag: str | None = None

    @classmethod
    def from_response(cls, size: int, etag: str | None) -> StoredObject:
        """From a listing entry's or a HEAD's ``Size``/``ContentLength`` and ``ETag``."""
        return cls(size, None if etag is None else etag.strip('"').lower())

    def etag_vouches_for(self, md5_hex: str | None) -> bool:
        """True when the ETag is the MD5 of ``md5_hex``'s bytes: then the object holds those
        bytes. False says nothing: an ETag may be no MD5 at all (multipart uploads, and
        objects encrypted with SSE-KMS, DSSE-KMS or SSE-C, whose 32-hex ETags are not MD5s)."""
        return md5_hex is not None and self.etag == md5_hex.lower()


class ConditionalPuts:
    """Whether one S3 client's server honours ``If-None-Match: *`` on PutObject (shared by the
    client's layers). It starts true; a server that answers the condition 501 NotImplemented
    turns it false for the rest of the process, with one log line."""

    def __init__(self) -> None:
        self.supported = True

    def unsupported(self, error: S3LayerError) -> None:
        """The server refused the condition itself: PUT unconditionally from now on."""
        if not self.supported:
            return
        self.supported = False
        log.warning(
            "s3 conditional writes not supported; using unconditional PUTs",
            bucket=error.bucket,
            code=error.code,
            status=error.status,
            note="as upstream writes: the first write no longer wins, and a write of a key that"
            " exists is answered as created",
        )


def refuses_conditional_writes(error: S3LayerError) -> bool:
    """True when a conditional PutObject was refused because the server does not implement the
    condition (501 ``NotImplemented``), not because of the object."""
    return error.code == "NotImplemented" or error.status == _NOT_IMPLEMENTED


def content_md5(body: bytes) -> str:
    """The base64 MD5 digest S3 expects in ``Content-MD5``."""
    return BodyDigest(body).content_md5


def etag_contradicts(etag: str | None, body: bytes) -> bool:
    """True when an ETag is a plain MD5 and it is not the MD5 of ``body``."""
    return BodyDigest(body).contradicted_by(etag)


def credential_refresh(
    client: S3Client, error: S3LayerError
) -> Callable[[], Awaitable[None]] | None:
    """What to await before retrying a call that S3 refused with an expired session token: a
    forced refresh of the client's credentials. None for static credentials (nothing to refresh).

    aiobotocore refreshes ``AioRefreshableCredentials`` (IAM role, web identity, container and
    SSO providers) on its own only when they are close to their *local* expiry time; a token the
    server already calls expired is not refreshed that way. No public call forces a refresh, so
    this does what aiobotocore's own mandatory refresh does: under the credentials' refresh lock,
    ``_protected_refresh(is_mandatory=True)``. Calls that failed with the same credentials refresh
    once: when they were replaced after ``error`` was seen, the retry just uses the new ones. A
    refresh that fails raises a ``S3LayerError`` (invalid credentials), which ends the retries.
    Providers with a cache of their own (assume role, web identity) hand back what they cached
    until it nears its expiry; then the retries fail as before and the error says why.
    """
    get_credentials = getattr(client, "_get_credentials", None)  # botocore's BaseClient
    credentials = get_credentials() if get_credentials is not None else None
    if not isinstance(credentials, AioRefreshableCredentials):
        return None
    refreshable: Any = credentials  # aiobotocore's untyped internals
    seen = refreshable._frozen_credentials

    async def refresh() -> None:
        async with refreshable._refresh_lock:
            if refreshable._frozen_credentials is not seen:
                return  # another call's refresh replaced the credentials that failed
            with map_credential_refresh_errors(error.operation, error.bucket, error.key):
                await refreshable._protected_refresh(is_mandatory=True)

    return refresh


class S3Layer:
    """One cache type's bucket."""

    def __init__(
        self,
        client: S3Client,
        spec: CacheSpec,
        *,
        bucket: str,
        key_prefix: str | None = None,
        conditional_puts: ConditionalPuts | None = None,
    ) -> None:
        self.client = client
        self.spec = spec
        self.bucket = bucket
        self.key_prefix = key_prefix
        self.conditional_puts = conditional_puts or ConditionalPuts()
        # Object keys whose repair has not succeeded yet: the next write of the key repairs
        # again instead of trusting the 412 its conditional PUT would get.
        self._unrepaired: set[str] = set()

    def object_key(self, key: str) -> str:
        """Where a row key lives in this bucket."""
        return object_key(key, key_strategy=self.spec.key_strategy, key_prefix=self.key_prefix)

    @contextmanager
    def _s3_call(self, operation: str, key: str | None = None) -> Iterator[None]:
        """``map_s3_errors`` on this bucket; an expired token's error carries the credential
        refresh to run before a retry (``credential_refresh``)."""
        try:
            with map_s3_errors(operation, self.bucket, key):
                yield
        except S3LayerError as exc:
            if exc.kind is ErrorKind.CREDENTIALS_EXPIRED:
                exc.before_retry = credential_refresh(self.client, exc)
            raise

    async def check_bucket(self) -> None:
        """Raise ``S3LayerError`` unless the bucket exists and may be listed.

        A one-key listing rather than HeadBucket: its error body carries a code, so a bad key
        (``InvalidAccessKeyId``) is told apart from a missing permission (``AccessDenied``).
        """
        try:
            with self._s3_call("ListObjectsV2"):
                await self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except S3LayerError as exc:
            if exc.kind is ErrorKind.NOT_FOUND:
                exc.kind = ErrorKind.MISSING_BUCKET
            raise

    async def head(self, key: str) -> int | None:
        """The stored object's size in bytes, or None when there is no object."""
        stored = await self.stat(key)
        return None if stored is None else stored.size

    async def stat(self, key: str) -> StoredObject | None:
        """The stored object's size and ETag (one HEAD), or None when there is no object."""
        try:
            with self._s3_call("HeadObject", key):
                response = await self.client.head_object(
                    Bucket=self.bucket, Key=self.object_key(key)
                )
        except S3LayerError as exc:
            if exc.kind is ErrorKind.NOT_FOUND:
                return None
            raise
        return StoredObject.from_response(int(response["ContentLength"]), response.get("ETag"))

    async def get(self, key: str) -> bytes | None:
        """The stored object's bytes, or None when there is no object."""
        return await self.get_raw(self.object_key(key))

    async def put(self, key: str, body: bytes) -> None:
        """Store ``body`` at the key's object, verified by the server against its MD5."""
        await self.put_raw(self.object_key(key), body)

    async def list_page(
        self,
        start_after: str | None,
        continuation_token: str | None,
        *,
        prefix: str | None = None,
    ) -> tuple[list[tuple[str, StoredObject]], str | None]:
        """One ListObjectsV2 page in key order: (object key, size and ETag) entries and the
        token for the next page (None when this was the last). Limited to ``prefix`` (a full
        object-key prefix) when given, else to ``key_prefix`` when set."""
        arguments: dict[str, str] = {"Bucket": self.bucket}
        if prefix is None and self.key_prefix:
            prefix = f"{self.key_prefix}/"
        if prefix:
            arguments["Prefix"] = prefix
        if continuation_token:
            arguments["ContinuationToken"] = continuation_token
        elif start_after:
            arguments["StartAfter"] = start_after
        with self._s3_call("ListObjectsV2"):
            response = await self.client.list_objects_v2(**arguments)  # type: ignore[arg-type]
        entries = [
            (item["Key"], StoredObject.from_response(int(item["Size"]), item.get("ETag")))
            for item in response.get("Contents", [])
        ]
        token = response.get("NextContinuationToken") if response.get("IsTruncated") else None
        return entries, token

    async def put_if_absent(self, key: str, body: bytes) -> bool:
        """Store ``body`` unless the key's object exists (``If-None-Match: *``): first write
        wins. True if stored, False if an object was already there.

        A conflict with a concurrent conditional PUT is transient. An answer whose ETag is an MD5
        that contradicts the body (an upload damaged on the way, or a server that ignored the
        condition and overwrote an object) is checked by reading the object: if its bytes differ
        it is written again, unconditionally (``repair``). Nothing is ever deleted. Encrypted
        objects' ETags are no MD5s and are not judged. A 412 is taken at its word (first write
        wins), except for an object whose repair failed in this process: that is repaired again.
        After a 501 to the condition (``ConditionalPuts``) every PUT is unconditional and
        answers True.
        """
        object_key = self.object_key(key)
        digest = BodyDigest(body)
        if object_key in self._unrepaired:
            await self.repair(object_key, body)
            return True
        if self.conditional_puts.supported:
            try:
                with self._s3_call("PutObject", object_key):
                    response = await self.client.put_object(
                        Bucket=self.bucket,
                        Key=object_key,
                        Body=body,
                        ContentMD5=digest.content_md5,
                        IfNoneMatch="*",
                    )
            except S3LayerError as exc:
                if exc.code == "PreconditionFailed" or exc.status == _PRECONDITION_FAILED:
                    return False
                if exc.code == "ConditionalRequestConflict":
                    exc.kind = ErrorKind.TRANSIENT
                if not refuses_conditional_writes(exc):
                    raise
                self.conditional_puts.unsupported(exc)
            else:
                if digest.contradicted_by_put(response):
                    await self.repair(object_key, body)
                return True
        with self._s3_call("PutObject", object_key):
            response = await self.client.put_object(
                Bucket=self.bucket, Key=object_key, Body=body, ContentMD5=digest.content_md5
            )
        if digest.contradicted_by_put(response):
            await self.repair(object_key, body)
        return True

    async def repair(self, object_key: str, body: bytes) -> None:
        """Make the object hold ``body`` after an answer said it may not: read it, and if its
        bytes differ (or it is missing) PUT ``body`` unconditionally, checked like ``put_raw``
        (a transient ``BadDigest`` if that answer contradicts it too; the key's next write
        repairs again). Never deletes."""
        stored = await self.get_raw(object_key)
        if stored == body:
            self._unrepaired.discard(object_key)
            log.debug("s3 object checked: its bytes are the ones sent", key=object_key)
            return
        log.warning(
            "s3 object damaged; writing it again",
            bucket=self.bucket,
            key=object_key,
            stored_size=None if stored is None else len(stored),
            size=len(body),
        )
        self._unrepaired.add(object_key)
        await self.put_raw(object_key, body)
        self._unrepaired.discard(object_key)

    async def get_raw(self, object_key: str) -> bytes | None:
        """An object by its full object key (not a row key), or None when it does not exist."""
        try:
            with self._s3_call("GetObject", object_key):
                response = await self.client.get_object(Bucket=self.bucket, Key=object_key)
                async with response["Body"] as stream:
                    body: bytes = await stream.read()
        except S3LayerError as exc:
            if exc.kind is ErrorKind.NOT_FOUND:
                return None
            raise
        return body

    async def put_raw(self, object_key: str, body: bytes) -> None:
        """Store an object by its full object key, with ``Content-MD5``, checked by ETag."""
        digest = BodyDigest(body)
        with self._s3_call("PutObject", object_key):
            response = await self.client.put_object(
                Bucket=self.bucket, Key=object_key, Body=body, ContentMD5=digest.content_md5
            )
        if digest.contradicted_by_put(response):
            raise self._damaged_upload(object_key)

    def _damaged_upload(self, object_key: str) -> S3LayerError:
        """The transient error for a PUT whose stored bytes are not the ones sent."""
        return S3LayerError(
            f"PutObject s3://{self.bucket}/{object_key}: the stored object's ETag is not the"
            " MD5 of the bytes sent",
            kind=ErrorKind.TRANSIENT,
            operation="PutObject",
            bucket=self.bucket,
            key=object_key,
            code="BadDigest",
        )

    async def probe_write_permission(self, object_key: str) -> bool:
        """Check PutObject permission, storing nothing where the server allows it.

        Sends a PUT whose ``Content-MD5`` cannot match: a server that verifies digests answers
        ``BadDigest``/``InvalidDigest`` (authorised, nothing stored) or ``AccessDenied`` (raised).
        A server that does not verify digests stores the probe, which is deleted at once.
        Returns True when nothing was stored, False when the probe had to be deleted.
        """
        wrong_digest = content_md5(b"not the body")
        try:
            with self._s3_call("PutObject", object_key):
                await self.client.put_object(
                    Bucket=self.bucket, Key=object_key, Body=b"probe", ContentMD5=wrong_digest
                )
        except S3LayerError as exc:
            if exc.code in ("BadDigest", "InvalidDigest"):
                return True
            raise
        with self._s3_call("DeleteObject", object_key):
            await self.client.delete_object(Bucket=self.bucket, Key=object_key)
        return False
