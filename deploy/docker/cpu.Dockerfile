# CPU images, from one multi-stage build with CPU-only torch:
#
#   docker build -f deploy/docker/cpu.Dockerfile -t supportlens:cpu .                      # serving (slim)
#   docker build -f deploy/docker/cpu.Dockerfile --target train -t supportlens:cpu-train .  # training, retraining, batch scoring
#
# The serving image (the last stage, built by default) holds the server and what it
# imports (serve-requirements.txt): no training, evaluation, test or benchmark packages.
# Build arguments (none of them secret: a private index's credentials belong in a build
# secret, never in an ARG, which the image history keeps):
#   PYTHON_IMAGE     Debian bookworm with Python 3.11 (the official slim image by default)
#   TORCH_INDEX_URL  the index holding CPU-only torch wheels
# Every version comes from requirements/constraints.txt, torch's included.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# checkov:skip=CKV_DOCKER_7: FROM takes PYTHON_IMAGE, which defaults to a fixed tag (python:3.11-slim-bookworm)

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/supportlens/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/supportlens
COPY requirements/constraints.txt requirements/constraints.txt
# torch alone first, from the CPU wheel index, at the version the constraints pin (local
# label such as +cpu dropped): the default wheel would pull several GB of CUDA libraries.
# The pins come from the constraints file, which hadolint cannot see (DL3013).
# hadolint ignore=DL3013
RUN pip install --no-deps --index-url "${TORCH_INDEX_URL}" \
        "$(grep -E '^torch==' requirements/constraints.txt | sed 's/+.*//')" \
    && grep -v -E '^torch==' requirements/constraints.txt > /tmp/constraints.txt \
    && pip install --constraint /tmp/constraints.txt \
        "$(grep -E '^torch==' requirements/constraints.txt | sed 's/+.*//')"
COPY deploy/docker/serve-requirements.txt /tmp/serve-requirements.txt
# What the server imports, at the versions of the constraints file (DL3013 cannot see them).
# hadolint ignore=DL3013
RUN pip install --constraint /tmp/constraints.txt --requirement /tmp/serve-requirements.txt
COPY pyproject.toml README.md ./
COPY models models
COPY training training
COPY service service
# The project itself; its serving dependencies are installed above (DL3013: "." has no version).
# hadolint ignore=DL3013
RUN pip install --no-deps .

FROM build AS build-train
# Everything the project declares (training, evaluation, batch scoring), for the Jobs, at
# the versions of the constraints file (DL3013 cannot see them).
# hadolint ignore=DL3013
RUN pip install --constraint /tmp/constraints.txt ".[batch]" \
    && pip uninstall --yes pip

# The serving venv, without pip, C headers or the packages' own test suites.
FROM build AS build-serve
RUN pip uninstall --yes pip \
    && rm -rf /opt/supportlens/lib/python3.11/site-packages/torch/include \
    && find /opt/supportlens/lib/python3.11/site-packages -depth -type d -name tests -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE} AS runtime
# Bytecode was compiled at install time; the root filesystem is read-only at run time.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/supportlens/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    SUPPORTLENS_HOST=0.0.0.0 \
    SUPPORTLENS_PORT=8000 \
    SUPPORTLENS_DEVICE=cpu \
    SUPPORTLENS_INTENT_BUNDLE=/models/intent/current/bundle \
    SUPPORTLENS_SUMMARIZER_BUNDLE=/models/summarizer/current/bundle \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
RUN useradd --system --uid 10001 --gid 0 --home-dir /app --create-home supportlens \
    && mkdir -p /models \
    && chown 10001:0 /models
# The recipes, at the relative paths the training Jobs name (training/recipes/...).
COPY training/recipes /app/training/recipes
WORKDIR /app
USER 10001:0
EXPOSE 8000
# Healthy = ready (models loaded): the route of the Kubernetes readiness probe.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SUPPORTLENS_PORT', '8000') + '/health', timeout=4)"]
# Exec form: the server is PID 1 and gets SIGTERM itself, so in-flight requests drain.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service.server"]

FROM runtime AS train
COPY --from=build-train /opt/supportlens /opt/supportlens

# Last stage, so the default target: the slim serving image.
FROM runtime AS serve
COPY --from=build-serve /opt/supportlens /opt/supportlens
