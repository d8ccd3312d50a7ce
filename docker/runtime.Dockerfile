# The edge image: the camrt runtime only (onnxruntime, no PyTorch). Build from the repository root:
#   docker build -f docker/runtime.Dockerfile -t camrt .
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY camrt ./camrt
RUN pip install --no-cache-dir . && useradd --create-home camrt
USER camrt
ENTRYPOINT ["camrt"]
