# nestad: CPU image by default; build a CUDA image with
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t nestad:cuda .
# Run the training flow on the shared data (ingest.source is ../shared/... from /app); point
# MLflow at a tracking server to keep the registered model beyond the container:
#   docker run --rm -v "$PWD/../shared:/shared:ro" -e MLFLOW_TRACKING_URI=http://host:5000 nestad
#   docker run --rm --gpus all -v "$PWD/../shared:/shared:ro" nestad:cuda nestad run --profile paper
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_INDEX=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DVC_NO_ANALYTICS=1

# git: DVC and the lineage record read the commit.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 nestad
WORKDIR /app

# Dependencies first, for layer caching: torch from the chosen index, then the rest pinned.
COPY pyproject.toml constraints.txt README.md ./
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

COPY components ./components
COPY flows ./flows
# The project itself: params, the DVC pipeline (its stages run from /app) and the deployment.
COPY params.yaml dvc.yaml prefect.yaml ./
RUN grep -v '^torch==' constraints.txt > /tmp/c.txt && pip install -c /tmp/c.txt -e . \
 && chown -R nestad:nestad /app
USER 10001

# Default: the whole training flow (ingest -> validate -> train -> evaluate -> register).
CMD ["nestad", "run"]
