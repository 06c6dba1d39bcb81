# syntax=docker/dockerfile:1
# GPU image of the o2u scoring server.
#
# The CUDA runtime libraries come with the torch wheels (nvidia-* packages), so a slim Python base
# is enough; the NVIDIA container toolkit injects the driver at run time. The install commands in
# the builder stage are the ones CI runs (`make venv`): torch and torchvision first by exact pin,
# then the project. tests/docker/test_dockerfile.py keeps the pins, ports and user in step with
# pyproject.toml and the server settings.
#
#   docker build -t o2u:0.1.0 .
#   docker run --gpus all --shm-size 8g -p 50051:50051 -p 9464:9464 -v o2u-state:/var/lib/o2u o2u:0.1.0
#   (--shm-size: a job on several GPUs holds its samples in /dev/shm; docs/operations.md)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/o2u/bin:$PATH

RUN python -m venv /opt/o2u \
    && python -m pip install --upgrade pip

# Own layer: the torch wheels are gigabytes and change far less often than the code.
RUN python -m pip install torch==2.14.1 torchvision==0.29.1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY o2u_engine ./o2u_engine
COPY server ./server
COPY client/python ./client/python
COPY protos/python ./protos/python
RUN python -m pip install . \
    && python -c "import o2u_engine, o2u_server.app, o2u_client, o2u.v1.scoring_pb2"

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

# tini runs as PID 1 so SIGTERM reaches the server (which then drains and checkpoints) and
# zombie processes are reaped.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# uid/gid 1000 matches runAsUser/fsGroup in the Helm chart. The state directory is the only
# writable path besides /tmp (the chart mounts a volume here and runs read-only otherwise).
RUN groupadd --gid 1000 o2u \
    && useradd --uid 1000 --gid 1000 --home-dir /var/lib/o2u --no-create-home \
        --shell /usr/sbin/nologin o2u \
    && install -d -o 1000 -g 1000 -m 0750 /var/lib/o2u

COPY --from=builder /opt/o2u /opt/o2u

# Caches that torch and friends write go to /tmp, never to the read-only root filesystem.
ENV PATH=/opt/o2u/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/torch \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    O2U_LISTEN_ADDRESS=0.0.0.0:50051 \
    O2U_METRICS_ADDRESS=0.0.0.0 \
    O2U_METRICS_PORT=9464 \
    O2U_STATE_DIR=/var/lib/o2u

USER 1000:1000
WORKDIR /var/lib/o2u
VOLUME ["/var/lib/o2u"]

# gRPC API, Prometheus /metrics.
EXPOSE 50051 9464

# Startup loads torch and probes CUDA, which can take a while on a cold node.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["o2u-healthcheck", "--address", "127.0.0.1:50051", "--timeout", "5"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["o2u-server"]
