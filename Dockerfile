# dualglow BIDS-App image: CUDA-capable, runs with no network.
#
#   docker build -t dualglow .
#   docker run --rm --gpus all -v $PWD/bids:/data:ro -v $PWD/out:/out dualglow /data /out participant
#
# Base: the official PyTorch runtime image, CUDA 12.1 + cuDNN 9. CUDA 12.1 runs on NVIDIA
# drivers >= 525.60.13 (Linux), which covers most clusters; a CPU-only host runs it too.
# Override with --build-arg PYTORCH_IMAGE=... for another CUDA (see docs/CONTAINERS.md).
ARG PYTORCH_IMAGE=pytorch/pytorch:2.5.1-cuda12.1-cudnn9-runtime
FROM ${PYTORCH_IMAGE}

ARG DUALGLOW_VERSION=0.1.0
LABEL org.opencontainers.image.title="dualglow" \
      org.opencontainers.image.description="BIDS-App: synthetic FDG-PET from T1w MRI with DUAL-GLOW" \
      org.opencontainers.image.version="${DUALGLOW_VERSION}" \
      org.opencontainers.image.source="https://github.com/dualglow/dualglow" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Templates and weights live in the image, read-only, so the container needs no network.
# HOME and caches point at /tmp so any --user UID works, also with --read-only + a tmpfs /tmp.
ENV TEMPLATEFLOW_HOME=/opt/templateflow \
    DUALGLOW_TEMPLATE_CACHE=/opt/dualglow/template-cache \
    DUALGLOW_MODELS_DIR=/opt/dualglow/models \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    DUALGLOW_NO_PROGRESS=1

COPY . /opt/dualglow/src
WORKDIR /opt/dualglow/src

# The same install script as `make test` and CI (docker/install.sh); the base image's torch
# (CUDA build) is kept, so DUALGLOW_TORCH_SPEC is empty here.
RUN DUALGLOW_TORCH_SPEC="" DUALGLOW_INSTALL_MODE=wheel bash docker/install.sh python \
    && python docker/prefetch.py \
    && mkdir -p /opt/dualglow/models \
    && cp -r models/. /opt/dualglow/models/ \
    && rm -rf /opt/dualglow/src/.git \
    && useradd --create-home --uid 1000 --shell /bin/bash dualglow

USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["dualglow"]
CMD ["--help"]
