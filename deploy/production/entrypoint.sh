#!/bin/sh
# Entrypoint of the production containers: secrets come from mounted files, never from the
# compose file, an image layer or a command line. For each secret NAME below, when NAME_FILE is
# set, NAME is exported with the file's content (trailing newline removed) and NAME_FILE unset;
# RAY_AUTH_TOKEN_FILE instead becomes Ray's RAY_AUTH_TOKEN_PATH (the path, not the value).
# Then the MLflow server's backend URI is assembled from MLFLOW_DB_* (so the database password
# stays out of argv and out of the compose file), and the command runs.
set -eu

for name in MLOPS_API_TOKEN MLFLOW_TRACKING_PASSWORD DAGSTER_PG_PASSWORD MLFLOW_DB_PASSWORD \
            MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY AWS_SECRET_ACCESS_KEY; do
  eval "file=\${${name}_FILE:-}"
  if [ -n "$file" ]; then
    if [ ! -r "$file" ]; then
      echo "entrypoint: ${name}_FILE points at $file, which is not readable" >&2
      exit 1
    fi
    value="$(cat "$file")"
    export "$name=$value"
    unset "${name}_FILE"
  fi
done
unset file value

# The Ray token stays a file: Ray (and the platform's dashboard client) read RAY_AUTH_TOKEN_PATH
# themselves, so the value never enters the environment that replicas inherit.
if [ -n "${RAY_AUTH_TOKEN_FILE:-}" ]; then
  if [ ! -s "$RAY_AUTH_TOKEN_FILE" ]; then
    echo "entrypoint: RAY_AUTH_TOKEN_FILE points at $RAY_AUTH_TOKEN_FILE, which is missing or empty" >&2
    exit 1
  fi
  export RAY_AUTH_TOKEN_PATH="$RAY_AUTH_TOKEN_FILE"
  unset RAY_AUTH_TOKEN_FILE
fi

if [ -z "${MLFLOW_BACKEND_STORE_URI:-}" ] && [ -n "${MLFLOW_DB_HOST:-}" ]; then
  # Use URL-safe passwords (e.g. `openssl rand -hex 24`): the password is not URL-encoded here.
  # The driver is named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, not installed.
  export MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://${MLFLOW_DB_USER}:${MLFLOW_DB_PASSWORD}@${MLFLOW_DB_HOST}:${MLFLOW_DB_PORT:-5432}/${MLFLOW_DB_NAME:-mlflow}"
fi

exec "$@"
