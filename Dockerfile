# The hindsight project image: Ray head and worker nodes of docker-compose.yml run it.
#
#   docker build -t hindsight .                                  # CPU torch (default)
#   docker build -t hindsight --build-arg TORCH_VARIANT=cu128 .  # a CUDA build of torch
#
# torch is installed first from PyTorch's index for the chosen variant, so installing the
# project afterwards finds it already satisfied and pulls no other build.
FROM python:3.11-slim

# The client that runs `hindsight submit` should use the same Ray version as the cluster.
ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TQDM_DISABLE=1

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install "ray[data,train,default]==${RAY_VERSION}"

WORKDIR /opt/hindsight
# Dependencies first (cached while only the code changes), then the code.
COPY pyproject.toml README.md ./
RUN mkdir -p schemas engine relabelers jobs trainers bench examples \
    && for package in schemas engine relabelers jobs trainers bench examples; do \
         touch "$package/__init__.py"; done \
    && pip install ".[minari]" \
    && pip uninstall -y hindsight-engine
COPY . .
RUN pip install --no-deps ".[minari]"

# Ray's processes run as an unprivileged user; /tmp/ray holds their session files.
# The `runs` volume of docker-compose.yml mounts on /home/hindsight/runs (training runs).
RUN useradd --create-home --uid 1000 hindsight
USER hindsight
RUN mkdir -p /home/hindsight/runs
WORKDIR /home/hindsight
CMD ["hindsight", "--help"]
