# syntax=docker/dockerfile:1
# m2t for GPU Ray clusters (KubeRay worker pods, the cluster launcher's nodes).
#
#   docker build -f infra/docker/gpu.Dockerfile -t REGISTRY/m2t-gpu:0.2.0 .      (from the repo root)
#   docker run --rm REGISTRY/m2t-gpu:0.2.0                                         (smoke: m2t models)
#
# Build with BuildKit (Docker >= 23's default; DOCKER_BUILDKIT=1 before): it reads
# gpu.Dockerfile.dockerignore beside this file; the legacy builder would send the whole checkout,
# .venv included, as the context.
#
# Base: the official Ray image of the Ray version the project is tested with (2.60.0; pyproject
# allows ray>=2.40), Python 3.11, CUDA 12.8. torch is installed first, pinned like the Makefile
# (torch==2.13.0) but as the build for the base image's CUDA (cu128), exactly as the README says
# for GPU machines; then the project with `pip install -e ".[pipeline]"`. The shipped weights
# (m2t_core/weights/*.safetensors and previous/: 8.2 MB a file) are in the image. Runs as the base image's non-root
# user `ray` (uid 1000, gid 100 `users`). Expected size: an estimate of ~11 GB uncompressed (the CUDA base ~6 GB,
# torch cu128 with its nvidia-* wheels ~4.5 GB, the rest <0.5 GB); not built here (no Docker daemon).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

USER 1000
# Made by the user that owns it (WORKDIR alone would make it root's under some builders).
RUN mkdir -p /home/ray/m2t
WORKDIR /home/ray/m2t
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_ARENA_MAX=2

# torch first, in its own layer: the largest part, and it changes least often.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 m2t_core ./m2t_core
COPY --chown=1000:100 pipeline ./pipeline
COPY --chown=1000:100 jobs ./jobs
COPY --chown=1000:100 configs ./configs
# As the Makefile does: a constraint pins the torch build just installed, so that the project's
# install cannot swap it for another build.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir -c /tmp/torch-constraint.txt -e ".[pipeline]" \
    && rm /tmp/torch-constraint.txt \
    && m2t --version \
    && python -c "from m2t_core import int8_linear; print('exact linears on int8 units:', int8_linear.status())" \
    && python -c "from m2t_core import cpu_kernels; print('g_s kernels run on:', cpu_kernels.threads())" \
    && m2t models

CMD ["m2t", "models"]
