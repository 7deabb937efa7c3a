# syntax=docker/dockerfile:1
#
# The llava-features container image: the official Ray image with CUDA (the Ray and Python versions
# the project is tested with) plus this package, with its compiled resampler (pipeline/images/_resample.c).
# The KubeRay manifests in configs/kuberay/ run it in every Ray container.
#
#   docker build -t registry.example.com/llava-features:0.1.0 .
#   docker push registry.example.com/llava-features:0.1.0
#   # then put that name in configs/kuberay/kustomization.yaml (`images:`), the one place it is named
#
# No dependency is listed here: pip installs the project's wheel, whose metadata is pyproject.toml's
# `dependencies`. Only torch goes in first, with the Makefile's pin (TORCH_SPEC), exactly as
# `make setup` does, so that pyproject's torch range never pulls another build over it. The torch
# wheels bring their own CUDA runtime libraries; to take a build from another index (e.g. one CUDA
# version), pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128.
# tests/test_kuberay.py checks these rules and that the manifests' rayVersion is RAY_VERSION.

ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG CUDA_TAG=cu128
# Tags of the official images: <ray version>-py<3XY>-cu<XYZ> (e.g. rayproject/ray:2.60.0-py311-cu128).
ARG BASE_IMAGE=rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}

# -- build stage: the project's wheel, with the compiled resampler -------------------------------
FROM ${BASE_IMAGE} AS build
# A C compiler and the Python headers for pipeline/images/_resample.c. The CUDA images keep g++ (they are
# built on NVIDIA's devel images) and conda's Python ships its headers, but install the toolchain
# anyway: a no-op where it is present, and needed on a CPU base.
RUN sudo apt-get update \
 && sudo apt-get install -y --no-install-recommends build-essential \
 && sudo rm -rf /var/lib/apt/lists/*
WORKDIR /home/ray/build
# What the build reads: pyproject.toml (and its readme), setup.py (the extension) and the packages.
COPY --chown=ray:users pyproject.toml setup.py README.md ./
COPY --chown=ray:users pipeline ./pipeline
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users llava_features ./llava_features
# setup.py only warns when the extension cannot be built (the package then falls back to Pillow);
# an image must not ship that silently, so the build fails if the wheel lacks it.
RUN <<EOF
#!/bin/bash
set -euo pipefail
python -m pip wheel --no-cache-dir --no-deps --wheel-dir /home/ray/wheels .
python - <<'PY'
import glob
import zipfile

(wheel,) = glob.glob("/home/ray/wheels/llava_features-*.whl")
names = zipfile.ZipFile(wheel).namelist()
assert any(n.startswith("pipeline/images/_resample") and n.endswith(".so") for n in names), (
    f"{wheel} holds no compiled pipeline.images._resample: see the build log above"
)
PY
EOF

# -- the image ------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG RAY_VERSION
# The Makefile's TORCH_SPEC (tests/test_kuberay.py keeps the two equal).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
RUN python -m pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC}"
COPY --from=build /home/ray/wheels /tmp/wheels
# The project and pyproject's dependencies. The base image's Ray already satisfies `ray[serve,data]`
# (pip installs only the extras' missing packages); the check below fails the build if pip ever
# replaced it, since the manifests' rayVersion and every node must run the image's Ray.
RUN <<EOF
#!/bin/bash
set -euo pipefail
python -m pip install --no-cache-dir /tmp/wheels/llava_features-*.whl
rm -rf /tmp/wheels
python - <<PY
import ray
from pipeline.images import resampler_name

assert ray.__version__ == "${RAY_VERSION}", f"pip replaced the base image's Ray ${RAY_VERSION} by {ray.__version__}"
assert resampler_name() != "pillow", "the compiled resampler pipeline.images._resample does not load"
print("llava-features image: Ray", ray.__version__, "| resize route:", resampler_name())
PY
EOF
# Our YAML configs, at the paths the manifests use (`--config configs/llava-v1.5-7b.yaml`): relative
# paths resolve against this directory, the working directory of `ray start` and so of every Ray
# worker process, job driver and Serve application builder in the pod.
WORKDIR /home/ray/llava-features
COPY --chown=ray:users configs ./configs
