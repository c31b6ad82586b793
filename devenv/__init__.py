"""Real local PostgreSQL and S3 servers for tests, the demo and benchmarks.

``process`` holds what every server shares (start, stop at exit or SIGTERM, free ports),
``postgres`` and ``s3`` the servers themselves.
"""

from devenv.postgres import (
    ContainerPostgres,
    LocalPostgres,
    LocalStandby,
    PostgresEndpoint,
    PostgresServer,
    start_postgres,
)
from devenv.process import docker_available, free_port, packaged_binary
from devenv.s3 import (
    MinioS3,
    MotoS3,
    S3Endpoint,
    S3Identity,
    S3rverS3,
    S3Server,
    SeaweedS3,
    create_buckets,
    start_s3,
)

__all__ = [
    "ContainerPostgres",
    "LocalPostgres",
    "LocalStandby",
    "MinioS3",
    "MotoS3",
    "PostgresEndpoint",
    "PostgresServer",
    "S3Endpoint",
    "S3Identity",
    "S3Server",
    "S3rverS3",
    "SeaweedS3",
    "create_buckets",
    "docker_available",
    "free_port",
    "packaged_binary",
    "start_postgres",
    "start_s3",
]
