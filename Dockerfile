# Serving images for the lightcycle deployables (an MLflow pyfunc over a converted archive).
# Two targets share one base stage:
#   torch (the default, last stage)  a TorchScript archive (<name>-scripted, -int8) on CPU torch
#   onnx  (--target onnx)            an ONNX graph (<name>-onnx) on onnxruntime, no torch at all
#
# The model is NOT in the image: the entry point loads it at start from MODEL_URI, either a
# registry URI (with MLFLOW_TRACKING_URI) or a model directory mounted into the container.
#
#   docker build -t lightcycle-serve .
#   docker run --rm -p 127.0.0.1:8080:8080 \
#       -e MLFLOW_TRACKING_URI=http://tracking.example:5000 \
#       -e MODEL_URI=models:/lightcycle-fashion-scripted@champion lightcycle-serve
#
#   docker build --target onnx -t lightcycle-serve-onnx .
#   docker run --rm -p 127.0.0.1:8080:8080 \
#       -e MLFLOW_TRACKING_URI=http://tracking.example:5000 lightcycle-serve-onnx
#
# Needs BuildKit (Docker >= 23 default) or podman/buildah for `RUN --mount`.
# Build-time-only files: docker/build-extras/ca-bundle.pem (CA bundle for an HTTPS-intercepting
# proxy) and docker/build-extras/wheels/ (local wheels, e.g. a CPU torch) are bind-mounted into
# the install step when present and never end up in a layer. Do not commit that directory.

ARG BASE_IMAGE=python:3.11-slim
# CPU-only torch: PyTorch's CPU wheel index has no CUDA builds and no nvidia-* dependencies.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
# The onnx target: ONNX Runtime's CPU wheel from the package index (no torch, no CUDA).
ARG ONNXRUNTIME_VERSION=1.32.0
# mlflow-skinny serves pyfunc models (FastAPI + uvicorn) without the tracking server's
# dependencies (Flask, SQLAlchemy, scikit-learn, pyarrow, matplotlib, ...).
ARG MLFLOW_VERSION=3.17.2
ARG NUMPY_VERSION=2.4.6
ARG PANDAS_VERSION=2.3.3

# ---------------------------------------------------------------- base: shared by both targets
FROM ${BASE_IMAGE} AS base

LABEL org.opencontainers.image.title="lightcycle-serve" \
      org.opencontainers.image.description="MLflow scoring server for the lightcycle FashionMNIST classifier (CPU)"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 app \
 && useradd --system --no-log-init --uid 10001 --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app

COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/lightcycle-serve

WORKDIR /home/app

# Run-time settings (see docker/entrypoint.sh): MODEL_URI (default: each target's
# LIGHTCYCLE_DEFAULT_MODEL_URI), MLFLOW_TRACKING_URI (+ its auth variables), PORT, HOST,
# MLFLOW_MODELS_WORKERS. No default tracking URI and no credentials here.
ENV PORT=8080
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ping' % os.environ.get('PORT', '8080'), timeout=4)"]

ENTRYPOINT ["lightcycle-serve"]

# ---------------------------------------------------------------- onnx: ONNX Runtime, no torch
FROM base AS onnx
ARG ONNXRUNTIME_VERSION
ARG MLFLOW_VERSION
ARG NUMPY_VERSION
ARG PANDAS_VERSION

LABEL org.opencontainers.image.description="MLflow scoring server for the lightcycle FashionMNIST classifier, ONNX Runtime on CPU (no torch)"

# One layer: venv and serving deps (the CA bundle is the only build extra it uses). Then drop
# what serving never uses: the test suites of numpy and pandas (about 47 MB) and ONNX Runtime's
# offline tools (quantization, transformer optimizers, converters). No local wheels: nothing
# here needs the torch wheel that build-extras/wheels/ may hold.
RUN --mount=type=bind,source=docker,target=/tmp/docker \
    extras=/tmp/docker/build-extras \
 && if [ -f "$extras/ca-bundle.pem" ]; then export PIP_CERT="$extras/ca-bundle.pem"; fi \
 && python3 -m venv /opt/venv \
 && pip install --no-cache-dir "onnxruntime==${ONNXRUNTIME_VERSION}" \
        "mlflow-skinny==${MLFLOW_VERSION}" "numpy==${NUMPY_VERSION}" "pandas==${PANDAS_VERSION}" \
 && site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
 && rm -rf "$site/numpy/_core/tests" "$site/numpy/tests" "$site/pandas/tests" \
        "$site/onnxruntime/tools" "$site/onnxruntime/transformers" "$site/onnxruntime/quantization"

ENV LIGHTCYCLE_DEFAULT_MODEL_URI=models:/lightcycle-fashion-onnx@champion
# lightcycle's own code, for FOLLOW=1 only (serving/follow.py and what it imports: the standard
# library, mlflow-skinny, numpy). Last, so that a code change rebuilds this layer alone.
COPY src/lightcycle /opt/lightcycle/lightcycle
ENV PYTHONPATH=/opt/lightcycle
USER 10001:10001

# ---------------------------------------------------------------- torch: the default target
FROM base AS torch
ARG TORCH_INDEX_URL
ARG TORCH_VERSION
ARG MLFLOW_VERSION
ARG NUMPY_VERSION
ARG PANDAS_VERSION

# One layer: venv, CPU torch, serving deps. Then drop what serving never uses: torch's C++
# headers and CMake files (for compiling extensions), its C++ test binaries and protoc.
RUN --mount=type=bind,source=docker,target=/tmp/docker \
    extras=/tmp/docker/build-extras \
 && if [ -f "$extras/ca-bundle.pem" ]; then export PIP_CERT="$extras/ca-bundle.pem"; fi \
 && if [ -d "$extras/wheels" ]; then export PIP_FIND_LINKS="$extras/wheels"; fi \
 && python3 -m venv /opt/venv \
 && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir "mlflow-skinny==${MLFLOW_VERSION}" \
        "numpy==${NUMPY_VERSION}" "pandas==${PANDAS_VERSION}" \
 && python -c "import torch, sys; sys.exit(torch.version.cuda and 'CUDA build of torch %s: use a CPU wheel index' % torch.__version__)" \
 && torch_dir=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/torch \
 && rm -rf "$torch_dir/include" "$torch_dir/share/cmake" \
 && find "$torch_dir/bin" -type f \( -name 'test_*' -o -name '*Test' -o -name 'protoc*' \) -delete

ENV LIGHTCYCLE_DEFAULT_MODEL_URI=models:/lightcycle-fashion-scripted@champion
# lightcycle's own code, for FOLLOW=1 only (serving/follow.py and what it imports: the standard
# library, mlflow-skinny, numpy). Last, so that a code change rebuilds this layer alone.
COPY src/lightcycle /opt/lightcycle/lightcycle
ENV PYTHONPATH=/opt/lightcycle
USER 10001:10001
