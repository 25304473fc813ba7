# CUDA image: GPU serving (the gpu overlay) and the training, retraining and batch Jobs.
#
#   docker build -f deploy/docker/cuda.Dockerfile -t supportlens:cuda .
#
# torch's CUDA wheels bring the CUDA runtime libraries (nvidia-* wheels), so the base is the
# same slim Python image as the CPU one; the node supplies the driver (NVIDIA container
# toolkit, which reads NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES).
# Build arguments (none of them secret):
#   PYTHON_IMAGE     Debian bookworm with Python 3.11 (the official slim image by default)
#   TORCH_INDEX_URL  the index holding torch's CUDA wheels (cu128: drivers >= 570)
# Versions come from requirements/constraints.txt, torch's included.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# checkov:skip=CKV_DOCKER_7: FROM takes PYTHON_IMAGE, which defaults to a fixed tag (python:3.11-slim-bookworm)

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/supportlens/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/supportlens
COPY requirements/constraints.txt requirements/constraints.txt
# torch and its CUDA libraries from the CUDA wheel index, at the version the constraints
# pin (local label such as +cpu dropped). The pin comes from the file, which hadolint
# cannot see (DL3013).
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX_URL}" \
        "$(grep -E '^torch==' requirements/constraints.txt | sed 's/+.*//')" \
    && grep -v -E '^torch==' requirements/constraints.txt > /tmp/constraints.txt
COPY pyproject.toml README.md ./
COPY models models
COPY training training
COPY service service
# The project with the batch extra, every version pinned by the constraints file (which
# DL3013 cannot see).
# hadolint ignore=DL3013
RUN pip install --constraint /tmp/constraints.txt ".[batch]" \
    && pip uninstall --yes pip

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/supportlens/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SUPPORTLENS_HOST=0.0.0.0 \
    SUPPORTLENS_PORT=8000 \
    SUPPORTLENS_DEVICE=auto \
    SUPPORTLENS_INTENT_BUNDLE=/models/intent/current/bundle \
    SUPPORTLENS_SUMMARIZER_BUNDLE=/models/summarizer/current/bundle \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
RUN useradd --system --uid 10001 --gid 0 --home-dir /app --create-home supportlens \
    && mkdir -p /models \
    && chown 10001:0 /models
COPY --from=build /opt/supportlens /opt/supportlens
# The recipes, at the relative paths the Jobs name (training/recipes/...).
COPY --from=build /src/training/recipes /app/training/recipes
WORKDIR /app
USER 10001:0
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SUPPORTLENS_PORT', '8000') + '/health', timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service.server"]
