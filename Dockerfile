# syntax=docker/dockerfile:1
# usersvc container image: `docker build -t usersvc .` (see docs/operations.md, "Container").
#
# The base is pinned by tag and by digest (the multi-platform index of
# python:3.11.13-slim-bookworm), so a rebuild gets the same bytes; bump both
# together. Both stages use the same base, so the virtual environment built in
# the first one finds the same interpreter at the same path in the second.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest out).
COPY constraints.txt pyproject.toml README.md ./
COPY alembic/ alembic/
COPY generated/ generated/
COPY usersvc/ usersvc/

# The wheel is built without build isolation by the setuptools that
# constraints.txt pins, then installed with every dependency at its pinned
# version into a venv that is the only thing the runtime stage takes.
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --constraint constraints.txt setuptools \
    && /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist . \
    && python -m venv /opt/usersvc \
    && set -- /dist/usersvc-*.whl \
    && /opt/usersvc/bin/pip install --no-cache-dir --constraint constraints.txt "$1[speed]"

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and file
# ownership on mounted secrets is predictable.
RUN groupadd --system --gid 10001 usersvc \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin usersvc

# Owned by root, so the service cannot rewrite its own code.
COPY --from=build /opt/usersvc /opt/usersvc

# Production refuses to start without USERSVC_DATABASE_URL and a signing key
# (USERSVC_JWT_PRIVATE_KEY_FILE, e.g. a mounted secret): no embedded database
# and no generated key inside a container.
ENV PATH=/opt/usersvc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    USERSVC_ENV=production \
    USERSVC_LISTEN_ADDR=0.0.0.0:50051 \
    USERSVC_LOG_FORMAT=json

# Nothing is written at run time in production; a neutral working directory.
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051

# `usersvc healthcheck` asks the standard gRPC health service on
# USERSVC_LISTEN_ADDR (0.0.0.0 is dialled as 127.0.0.1).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["usersvc", "healthcheck", "--timeout", "3"]

# `docker run IMAGE` serves; `docker run IMAGE migrate` (or create-admin ...)
# runs another subcommand with the same environment.
ENTRYPOINT ["usersvc"]
CMD ["serve"]
