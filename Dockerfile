# dare_mega for GPU clusters: CUDA PyTorch, Transformer Engine, Apex, flash-attn, SGLang, and this package.
#
#   docker build -t dare_mega:latest .
#   docker run --gpus all --ipc=host --network=host -v /data:/data -v /ckpt:/ckpt dare_mega:latest \
#       bash examples/sft_sdar_moe.sh model.hf=/ckpt/SDAR-30B-A3B-Chat data.train=/data/sft.jsonl
#
# RL with code rewards runs each sample in nsjail, which needs namespaces Docker's defaults forbid; add
#   --security-opt seccomp=unconfined --security-opt apparmor=unconfined --cap-add SYS_ADMIN
# (and -v /sys/fs/cgroup:/sys/fs/cgroup:rw for a memory cgroup per sample), or use a SandboxFusion server
# (reward.code.backend=sandbox_fusion). Without either, the trainer refuses code rewards at start-up.
#
# Versions are the ones pyproject.toml pins (tests/test_docker.py checks that they agree). SGLang 0.5.23
# needs torch 2.14.1, so the image uses that torch; CPU machines use 2.13.0 (configs/constraints.txt).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ARG MEGATRON_CORE_VERSION=0.16.1
ARG TRANSFORMER_ENGINE_VERSION=2.20.2
ARG FLASH_ATTN_VERSION=2.8.3.post2
ARG SGLANG_VERSION=0.5.23
ARG APEX_REF=25.09
ARG MAX_JOBS=16

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NVTE_FRAMEWORK=pytorch \
    MAX_JOBS=${MAX_JOBS}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ninja-build build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Kernels: Transformer Engine and flash-attn from PyPI (built against the image's torch), NVIDIA Apex from
# source (the PyPI package named "apex" is an unrelated project and must never be installed).
RUN pip install --no-build-isolation "transformer-engine[pytorch]==${TRANSFORMER_ENGINE_VERSION}" \
    && pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"
RUN git clone --depth 1 --branch "${APEX_REF}" https://github.com/NVIDIA/apex.git /tmp/apex \
    && pip install --no-build-isolation --config-settings "--build-option=--cpp_ext" \
       --config-settings "--build-option=--cuda_ext" /tmp/apex \
    && rm -rf /tmp/apex

# Rollouts at scale.
RUN pip install "sglang==${SGLANG_VERSION}"

WORKDIR /opt/dare_mega
COPY pyproject.toml README.md ./
COPY dare_mega ./dare_mega
COPY configs ./configs
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks
RUN pip install "megatron-core==${MEGATRON_CORE_VERSION}" -e ".[gpu,sglang,test]"

CMD ["python", "-m", "dare_mega"]
