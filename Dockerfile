# syntax=docker/dockerfile:1
# Weft's CPU image: the README's two commands inside a container.
#   build: `make .venv/.weft-installed` (what `make serve` builds first: pinned deps, torch, the default model)
#   run:   `.venv/bin/weft serve` (the command `make serve` runs once the venv exists)
#
#   docker build -t weft:cpu .
#   docker run --rm -p 50051:50051 -p 8000:8000 weft:cpu [weft serve flags...]
#
# The CUDA variant is this file with torch's CUDA build (README "Scaling out"):
#   docker build --build-arg TORCH_INDEX= -t weft:cuda .
#   docker run --rm --gpus all -p 50051:50051 -p 8000:8000 weft:cuda

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# Where pip looks for torch besides PyPI. PyPI's Linux torch wheels are CUDA builds (several GB
# of NVIDIA libraries); this index holds the same version as `+cpu`, which pip prefers. An empty
# value keeps PyPI's CUDA build (the CUDA variant).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# make runs the install; gcc and libc6-dev compile the native CPU kernels at first use
# (kernels/cpu_native.py builds with -march=native, keyed by the CPU's flags, so they are built
# on the machine that runs the image, not here) and Triton's launcher on CUDA. Unpinned on purpose
# (DL3008): Debian drops superseded point-release versions, so an exact pin breaks the build later.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid, so that Kubernetes' runAsNonRoot can check it (deploy/k8s/deployment.yaml).
# /var/lib/weft is the model store (WEFT_HOME, a volume below).
RUN groupadd --gid 10001 weft \
    && useradd --uid 10001 --gid weft --create-home --home-dir /home/weft weft \
    && mkdir -p /opt/weft /var/lib/weft \
    && chown weft:weft /opt/weft /var/lib/weft

WORKDIR /opt/weft
USER 10001:10001

# Dependencies first, from the files the Makefile's stamp depends on, so that a source change
# reuses this layer. The project itself is installed editable (-e '.[test]'), so copying the
# source afterwards is enough; setuptools only needs the package folders to exist here.
COPY --chown=weft:weft Makefile pyproject.toml requirements.lock README.md ./
COPY --chown=weft:weft common/__init__.py common/
COPY --chown=weft:weft service/__init__.py service/
COPY --chown=weft:weft decoding/__init__.py decoding/
COPY --chown=weft:weft kernels/__init__.py kernels/
COPY --chown=weft:weft clients/__init__.py clients/
RUN PIP_EXTRA_INDEX_URL="${TORCH_INDEX}" PIP_NO_CACHE_DIR=1 make .venv/.weft-installed

COPY --chown=weft:weft . .

# The model store (named models, imported GGUF files) is a volume; converted models and compiled
# kernels stay in the image's cache (WEFT_CACHE_DIR, default ~/.cache/weft).
ENV WEFT_HOME=/var/lib/weft \
    PATH=/opt/weft/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1

# Convert the default model's GGUF once at build time (about 20 s) so that a new replica is
# ready in seconds instead of repeating it on every start.
RUN weft generate --max-tokens 1 --temperature 0 "Hello"

# Declared after every build step: what a RUN writes under a declared volume is discarded.
VOLUME ["/var/lib/weft"]

# gRPC (service/server.py DEFAULT_PORT) and HTTP: OpenAI/Ollama shim and /metrics
# (service/shim/app.py DEFAULT_HTTP_PORT).
EXPOSE 50051 8000

# `weft serve` drains on SIGTERM: health NOT_SERVING, new calls UNAVAILABLE, in-flight calls get
# --grace seconds (default 30), then it exits; a second SIGTERM cancels at once. `docker stop`
# waits 10 s by default before SIGKILL: give it more than the grace (`docker stop -t 40`).
# The server is PID 1 itself (exec form, no `make` or shell in between): make would stand
# between the signal and the server, and a shell as PID 1 does not pass SIGTERM on.
STOPSIGNAL SIGTERM

# Docker's own health check: grpc.health.v1 (open even with an API key), SERVING or not.
# Kubernetes uses its native gRPC probe instead (deploy/k8s/deployment.yaml).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "deploy/docker/healthcheck.py", "127.0.0.1:50051", "--timeout", "5"]

ENTRYPOINT ["/opt/weft/.venv/bin/weft", "serve"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", "--grace", "30"]
