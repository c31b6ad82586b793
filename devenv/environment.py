"""The ``SI_SDF__…`` environment for the service against local servers, exactly as an operator
would export it; shared by the demo, the tests' fixtures and the server benchmark. Pure: it
only builds a mapping."""

from __future__ import annotations

from devenv.postgres import PostgresEndpoint
from devenv.s3 import S3Endpoint

BUCKET_PREFIX = "si-layer-cache"
PG_POOL = "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__"
OBJECT_STORAGE = "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__"


def service_environment(
    pg: PostgresEndpoint,
    s3: S3Endpoint,
    *,
    bucket_prefix: str = BUCKET_PREFIX,
    dbname: str | None = None,
    persister_mode: str = "DualWrite",
) -> dict[str, str]:
    """The SI_SDF__ settings for local servers, exactly as an operator would export them."""
    return {
        "SI_SDF__LAYER_DB_CONFIG__PERSISTER_MODE": persister_mode,
        PG_POOL + "HOSTNAME": pg.host,
        PG_POOL + "PORT": str(pg.port),
        PG_POOL + "USER": pg.user,
        PG_POOL + "PASSWORD": pg.password,
        PG_POOL + "DBNAME": dbname or pg.dbname,
        PG_POOL + "SSLMODE": "disable",  # local servers speak plain TCP on loopback
        OBJECT_STORAGE + "ENDPOINT": s3.url,
        OBJECT_STORAGE + "REGION": s3.region,
        OBJECT_STORAGE + "BUCKET_PREFIX": bucket_prefix,
        OBJECT_STORAGE + "AUTH__STATIC_CREDENTIALS__ACCESS_KEY": s3.access_key,
        OBJECT_STORAGE + "AUTH__STATIC_CREDENTIALS__SECRET_KEY": s3.secret_key,
    }
