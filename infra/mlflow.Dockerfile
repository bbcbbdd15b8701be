# MLflow's image is python + mlflow alone: the server also needs a Postgres driver for its backend
# store (psycopg 3: SQLAlchemy 2.1 reads postgresql:// with it, not psycopg2) and boto3 to proxy artifacts
# (--serve-artifacts) to MinIO's S3 API. tests/test_mlflow_stack.py runs the server with these drivers.
FROM ghcr.io/mlflow/mlflow:v3.17.2

RUN pip install --no-cache-dir "psycopg[binary]==3.3.9" boto3==1.44.8
