# The GPU image: the camrt runtime with onnxruntime-gpu (onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9) on NVIDIA's CUDA runtime
# base; no PyTorch. Build from the repository root and run with the NVIDIA container toolkit:
#   docker build -f docker/gpu.Dockerfile -t camrt:gpu .
#   docker run --rm --gpus all -v "$PWD:/data" camrt:gpu explain /data/model.camrt.onnx /data/photos \
#       --device cuda -o /data/out
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ARG ONNXRUNTIME_GPU=onnxruntime-gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/camrt/bin:$PATH
# Ubuntu's python3 is externally managed (PEP 668): camrt goes into its own virtual environment.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/camrt
COPY pyproject.toml README.md /src/
COPY camrt /src/camrt
COPY docker/install-runtime.sh /usr/local/bin/camrt-install-runtime
RUN PYTHON=/opt/camrt/bin/python ONNXRUNTIME_GPU="$ONNXRUNTIME_GPU" camrt-install-runtime gpu /src \
    && rm -rf /src \
    && useradd --create-home --uid 10001 camrt

USER 10001
WORKDIR /home/camrt
ENTRYPOINT ["camrt"]
CMD ["--help"]
