# MLflow's image is python + mlflow alone: the server also needs a Postgres driver for its backend
# store and boto3 to proxy artifacts (--serve-artifacts) to MinIO's S3 API.
FROM ghcr.io/mlflow/mlflow:v3.17.2

RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.44.5
