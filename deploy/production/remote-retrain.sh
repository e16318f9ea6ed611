#!/usr/bin/env bash
# From CI (continuous-training.yml): queue the `retraining` job on the production Dagster instance
# by running retrain.sh on its Docker host over SSH. The instance database is published nowhere,
# so CI never talks to it; the Dagster container on the host does. Needs DEPLOY_SSH_KEY,
# DEPLOY_KNOWN_HOSTS, DEPLOY_HOST, DEPLOY_PATH (as remote-deploy.sh) and RUN_TAGS (a JSON object).
set -euo pipefail
: "${RUN_TAGS:?set RUN_TAGS (the tags of the run, a JSON object)}"
. "$(dirname "$0")/remote.sh"
remote "cd $(printf %q "$DEPLOY_PATH") && deploy/production/retrain.sh $(printf %q "$RUN_TAGS")"
