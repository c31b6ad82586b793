# syntax=docker/dockerfile:1
#
# The si-layer-cache image: `python -m services`, the layer-cache service and its migration
# modes (e.g. SI_SDF__MIGRATION_MODE=backfillLayerCache). Build from the repository root:
#
#   docker build -t REGISTRY/si-layer-cache:0.1.0 .
#
# Two stages. The builder turns this project into a wheel and installs it, with its runtime
# dependencies only (no dev extras), into /opt/venv; the final stage copies just that venv.
# Both stages use the same patch-pinned python:3.11-slim image, so the venv's interpreter
# symlinks stay valid (pin it by digest too, python:3.11.13-slim-bookworm@sha256:…, for
# byte-for-byte reproducible builds). Nothing is configured here and no secrets are baked in:
# everything comes from SI_* environment variables at run time.

FROM python:3.11.13-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml ./
COPY layer_cache/ layer_cache/
COPY services/ services/
COPY migrations_mode/ migrations_mode/
COPY layer_cache_server/ layer_cache_server/
COPY si_layer_cache/ si_layer_cache/

# pip compiles the installed modules to .pyc here, so the read-only final image never needs to.
# The last command is a smoke test: every module of the CLI imports.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install /wheels/*.whl \
    && /opt/venv/bin/python -m services --version


FROM python:3.11.13-slim-bookworm

LABEL org.opencontainers.image.title="si-layer-cache" \
      org.opencontainers.image.description="SI layer cache service and its S3 backfill migration mode"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A fixed, numeric non-root user: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 si \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin si \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/si-layer-cache/write-queue
# The server's durable S3 write queue (SI_SDF__SERVER__WRITE_QUEUE_DIR); mount a persistent
# volume here so queued writes outlive the pod (docs/server.md, "The S3 write queue").

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001

ENTRYPOINT ["python", "-m", "services"]
