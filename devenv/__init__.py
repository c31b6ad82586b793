"""Real local PostgreSQL and S3 servers for tests, the demo and benchmarks (see ``servers``)."""

from devenv.servers import (
    ContainerPostgres,
    LocalPostgres,
    MinioS3,
    MotoS3,
    PostgresEndpoint,
    PostgresServer,
    S3Endpoint,
    S3rverS3,
    S3Server,
    create_buckets,
    docker_available,
    free_port,
    start_postgres,
    start_s3,
)

__all__ = [
    "ContainerPostgres",
    "LocalPostgres",
    "MinioS3",
    "MotoS3",
    "PostgresEndpoint",
    "PostgresServer",
    "S3Endpoint",
    "S3Server",
    "S3rverS3",
    "create_buckets",
    "docker_available",
    "free_port",
    "start_postgres",
    "start_s3",
]
