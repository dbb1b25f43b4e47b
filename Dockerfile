# The atr runner image: the `atr` CLI with its pipeline, used by docker-compose.yml's runner
# services (`atr serve`), and usable on its own: docker run --rm <image> run --print-config
#
# Build args:
#   TORCH_INDEX_URL  where torch comes from: the PyTorch CPU index by default; the compose gpu
#                    profile passes a CUDA one (the CUDA wheels bundle their CUDA libraries, so the
#                    slim base image is enough; the host needs the NVIDIA Container Toolkit).
#   TORCH_VERSION    the torch release, the same pin as the README's install command and constraints.txt.
#   PREFECT_VERSION, MLFLOW_VERSION  client versions, pinned to the server images in
#                    docker-compose.yml (a newer Prefect client can be refused by an older server);
#                    they must equal constraints.txt's pins (tests/test_lock.py checks both).
ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PREFECT_VERSION=3.9.1
ARG MLFLOW_VERSION=3.17.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: the largest download, and it changes far less often than the code.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Only what the package build needs (.dockerignore keeps everything else out of the context).
# pyproject.toml's package data brings pipeline/assets (the shipped tiny-trained checkpoint).
COPY pyproject.toml README.md constraints.txt /tmp/atr-src/
COPY pipeline /tmp/atr-src/pipeline
COPY storage /tmp/atr-src/storage
COPY flows /tmp/atr-src/flows
# A regular (not editable) install of the tested versions (constraints.txt, the lock); the installed torch
# (+cpu or a CUDA build of the same release) satisfies the lock's torch pin, so pip keeps it.
RUN pip install /tmp/atr-src -c /tmp/atr-src/constraints.txt "prefect==${PREFECT_VERSION}" "mlflow==${MLFLOW_VERSION}" \
 && rm -rf /tmp/atr-src \
 && atr --help > /dev/null

COPY docker/runner-healthcheck.py /usr/local/lib/atr/healthcheck.py

# Non-root user. /data (ATR_HOME and the Hugging Face cache) and /home/atr are volumes in
# docker-compose.yml; a fresh named volume takes this ownership from the image.
RUN useradd --create-home --home-dir /home/atr --uid 1000 --user-group --shell /bin/bash atr \
 && mkdir -p /data/atr /data/hf /config \
 && chown -R atr:atr /data /home/atr

ENV HOME=/home/atr \
    ATR_HOME=/data/atr \
    HF_HOME=/data/hf

USER atr
WORKDIR /home/atr

ENTRYPOINT ["atr"]
CMD ["--help"]
