#!/usr/bin/env bash
# On a Docker host: roll the production stack to the images $REGISTRY/mlops-assets-*:$MLOPS_IMAGE_TAG,
# wait until Dagster and MLflow answer, then serve the registry's champion on Ray Serve with
# `mlops-assets serve restore` (load-and-query check first; the previous version keeps serving if
# anything fails; aliases untouched). The model_deployment asset is materialized by training runs
# only: it deploys the champion its own run registered, never the latest materialization's.
# Secrets are files in deploy/production/secrets/, never arguments.
set -euo pipefail
cd "$(dirname "$0")"
: "${REGISTRY:?set REGISTRY}" "${MLOPS_IMAGE_TAG:?set MLOPS_IMAGE_TAG}"
for secret in postgres_password mlflow_admin_password mlflow_flask_secret api_token ray_auth_token; do
  [ -s "secrets/$secret" ] || { echo "deploy: secrets/$secret is missing (see secrets/.gitignore)" >&2; exit 1; }
done
export MLOPS_GIT_SHA="$(git rev-parse HEAD 2>/dev/null || echo unknown)"  # images carry no .git
compose=(docker compose -f docker-compose.yaml)
"${compose[@]}" pull --quiet
"${compose[@]}" up -d --no-build --remove-orphans

healthy() {
  "${compose[@]}" exec -T dagster-webserver python -c 'import sys, httpx
ok = httpx.get("http://localhost:3000/server_info", timeout=5).status_code == 200
ok = ok and httpx.get("http://mlflow:5000/health", timeout=5).status_code == 200
sys.exit(0 if ok else 1)' 2>/dev/null
}
for _ in $(seq 1 60); do healthy && break; sleep 5; done
healthy || { echo "deploy: Dagster or MLflow did not become healthy" >&2; "${compose[@]}" ps; exit 1; }

run() { "${compose[@]}" exec -T dagster-webserver /app/deploy/production/entrypoint.sh "$@"; }
if run mlops-assets status --no-endpoint >/dev/null; then
  run mlops-assets serve restore
else
  echo "deploy: no champion in the registry yet; serving is deployed by the first training run"
fi
run mlops-assets status
