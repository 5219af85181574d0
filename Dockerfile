# vlmserve's container image: `python -m runtime`, the KServe ServingRuntime form of the server.
#
#   docker build --build-arg ACCELERATOR=cpu -t vlmserve:0.1.0-cpu .
#   docker build --build-arg ACCELERATOR=gpu -t vlmserve:0.1.0-gpu .
#   docker build --build-arg ACCELERATOR=mlu --build-arg MLU_BASE_IMAGE=<Cambricon's torch_mlu image> \
#                -t vlmserve:0.1.0-mlu .
#
# ACCELERATOR picks the base (the tag suffix the Helm chart expects: charts/vlmserve, image.tag):
#   mlu  Cambricon's torch_mlu image (torch, torch_mlu and the MLU runtime in its system Python,
#        from Cambricon's registry or developer site: set MLU_BASE_IMAGE to the one you have;
#        the default below only shows the naming, it was not pulled or built here);
#   gpu  a CUDA PyTorch image (torch with CUDA, from Docker Hub's pytorch/pytorch);
#   cpu  a slim Python image with PyTorch's CPU wheel.
# The torch of the base is kept: vlmserve is installed with torch pinned to it.
#
# KServe's storage initializer puts the model at /mnt/models; the server runs as user 1000
# (the chart's runAsUser) and listens on 8080 (HTTP: OpenAI, KServe v2, /metrics) and 8081
# (gRPC: KServe v2). Building needs a Docker daemon (BuildKit, for the ARG in FROM).

ARG ACCELERATOR=cpu
ARG MLU_BASE_IMAGE=yellow.hub.cambricon.com/pytorch/pytorch:v1.24.0-torch2.5.0-ubuntu22.04-py310
ARG CUDA_BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
ARG CPU_BASE_IMAGE=python:3.11-slim-bookworm
ARG CPU_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

FROM ${MLU_BASE_IMAGE} AS base-mlu
FROM ${CUDA_BASE_IMAGE} AS base-gpu

FROM ${CPU_BASE_IMAGE} AS base-cpu
ARG CPU_TORCH_SPEC
# hadolint ignore=DL3013
RUN python -m pip install --no-cache-dir ${CPU_TORCH_SPEC}

# hadolint ignore=DL3006
FROM base-${ACCELERATOR} AS runtime
ARG ACCELERATOR
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/tmp/hf-home \
    VLMSERVE_ACCELERATOR=${ACCELERATOR}
WORKDIR /opt/vlmserve
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY kernels ./kernels
COPY runtime ./runtime
# torch stays the base's (constraint file), whichever base it is.
# hadolint ignore=DL3013
RUN python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > /tmp/torch.txt \
    && python -m pip install --no-cache-dir -c /tmp/torch.txt . \
    && rm /tmp/torch.txt \
    && python -c "import runtime.__main__"

# A non-root user (uid 1000, as the chart's securityContext), and the model folder it may read.
RUN (getent passwd 1000 >/dev/null || useradd --uid 1000 --create-home --shell /usr/sbin/nologin vlmserve) \
    && mkdir -p /mnt/models /tmp/hf-home \
    && chown -R 1000:1000 /mnt/models /tmp/hf-home
USER 1000
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "runtime"]
CMD ["--model_name=model", "--model_dir=/mnt/models", "--http_port=8080", "--grpc_port=8081"]
