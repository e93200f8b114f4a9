# OneToken image: the gRPC LLM worker, Ray nodes (encoder workers) and the ingest CLI all run from it.
# CPU by default; GPU hosts build with a CUDA torch wheel index and faiss-gpu in place of faiss-cpu
# (never both: they install the same module), as docker-compose.yml does:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#     --build-arg FAISS=faiss-gpu-cu12 -t onetoken:gpu .
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG FAISS=faiss-cpu
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
WORKDIR /app
COPY pyproject.toml README.md ./
COPY htcvlm htcvlm
COPY cache cache
COPY encoder_service encoder_service
COPY llm_worker llm_worker
COPY protos protos
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0 \
 && pip install --no-cache-dir . \
 && if [ "$FAISS" != faiss-cpu ]; then pip uninstall -y faiss-cpu && pip install --no-cache-dir "$FAISS"; fi
ENTRYPOINT ["onetoken"]
CMD ["serve", "--host", "0.0.0.0"]
