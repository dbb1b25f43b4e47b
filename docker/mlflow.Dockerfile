# MLflow tracking server for the atr compose stack: the official image plus the Postgres driver.
# The plain image ships no database driver (the -full variant ships all of them, several
# hundred MB more); installing it here instead of at container start keeps start-up offline
# and reproducible. The tag matches the mlflow the runner image installs (Dockerfile,
# MLFLOW_VERSION); tests/test_compose.py checks that they agree.
FROM ghcr.io/mlflow/mlflow:v3.17.2

# The compose file names the driver in the URI (postgresql+psycopg2://): SQLAlchemy 2.1's
# default for a bare postgresql:// is psycopg 3, which this image does not have.
# Flask-WTF: the basic-auth app (`--app-name basic-auth`, mlflow[auth]) needs it for CSRF.
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 Flask-WTF==1.3.0
