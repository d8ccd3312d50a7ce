# The edge image: the camrt runtime on CPU (onnxruntime, OpenCV headless; no PyTorch), entry point
# `camrt`. Build from the repository root:
#   docker build -f docker/edge.Dockerfile -t camrt .
#   docker run --rm -v "$PWD:/data" camrt explain /data/model.camrt.onnx /data/photos -o /data/out
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md /src/
COPY camrt /src/camrt
COPY docker/install-runtime.sh /usr/local/bin/camrt-install-runtime
RUN PYTHON=python camrt-install-runtime cpu /src \
    && rm -rf /src \
    && useradd --create-home --uid 10001 camrt

USER 10001
WORKDIR /home/camrt
ENTRYPOINT ["camrt"]
CMD ["--help"]
