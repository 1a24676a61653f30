# The staging stack's MLflow server: PostgreSQL backend (psycopg2), artifacts on MinIO (boto3).
FROM python:3.11-slim
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" psycopg2-binary "boto3>=1.43.115,<1.44"
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
