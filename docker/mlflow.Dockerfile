# The MLflow tracking server of a tokbench cluster, with the PostgreSQL driver for its backend
# store. Build from the repository root:
#
#   docker build -f docker/mlflow.Dockerfile -t tokbench-mlflow:3.17.2 .
#
# mlflow, psycopg2-binary and SQLAlchemy are pinned to the versions in docker/constraints.txt:
# the server and the tokbench clients that write to it speak the same REST API, and the server
# runs the driver stack `scripts/cluster.sh up --backend postgres` is tested with. Backend URIs
# name the driver (postgresql+psycopg2://): SQLAlchemy 2.1 maps a bare postgresql:// to
# psycopg 3, which this image does not have.
FROM python:3.11-slim-bookworm

ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.11
ARG SQLALCHEMY_VERSION=2.1.9

RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==${PSYCOPG2_VERSION}" \
        "sqlalchemy==${SQLALCHEMY_VERSION}" \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir -p /mlartifacts \
    && chown mlflow /mlartifacts

# By number, for Kubernetes' runAsNonRoot.
USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
# Arguments (backend store, artifact destination, allowed hosts) come from the compose file
# or the Kubernetes Deployment.
ENTRYPOINT ["mlflow", "server"]
