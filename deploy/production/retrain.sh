#!/usr/bin/env bash
# On the Docker host (remote-retrain.sh): queue the `retraining` job on the production instance;
# the daemon runs it (train, the promotion gate, register, deploy). $1: the run's tags, a JSON
# object. The command runs inside the Dagster webserver container, which reaches the database.
set -euo pipefail
cd "$(dirname "$0")"
tags="${1:-}"
[ -n "$tags" ] || tags='{}'
docker compose -f docker-compose.yaml exec -T dagster-webserver /app/deploy/production/entrypoint.sh \
  dagster job launch -w /app/workspace.yaml -j retraining --tags "$tags"
