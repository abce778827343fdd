# syntax=docker/dockerfile:1
# MLflow tracking server for infra/k8s/mlflow.yaml: the same MLflow as the training image (the
# pin must equal pyproject.toml's; tests/test_infra.py checks it) plus the Postgres driver for the
# backend store and boto3 for the S3 / MinIO artifact store. The upstream MLflow image ships
# neither driver. Build from the repository root:
#
#   docker build -f infra/docker/mlflow.Dockerfile -t vitscale-mlflow:3.17.2 .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.8 \
    && useradd --create-home --uid 1000 --user-group mlflow

USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
