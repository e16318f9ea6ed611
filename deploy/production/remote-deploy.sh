#!/usr/bin/env bash
# From CI (release.yml): run deploy.sh on one environment's Docker host over SSH, at the released tag.
# Needs DEPLOY_SSH_KEY, DEPLOY_HOST (user@host), DEPLOY_PATH (the repository checkout there, with
# deploy/production/secrets/ provisioned by an operator), REGISTRY and MLOPS_IMAGE_TAG.
set -euo pipefail
: "${DEPLOY_SSH_KEY:?}" "${DEPLOY_HOST:?}" "${DEPLOY_PATH:?}" "${REGISTRY:?}" "${MLOPS_IMAGE_TAG:?}"
key="$(mktemp)"
trap 'rm -f "$key"' EXIT
printf '%s\n' "$DEPLOY_SSH_KEY" >"$key"
chmod 600 "$key"
# printf %q quotes each value for the remote shell.
ssh -i "$key" -o BatchMode=yes -o StrictHostKeyChecking=accept-new "$DEPLOY_HOST" \
  "cd $(printf %q "$DEPLOY_PATH") && git fetch --tags --force origin && git checkout --force $(printf %q "$MLOPS_IMAGE_TAG") \
   && REGISTRY=$(printf %q "$REGISTRY") MLOPS_IMAGE_TAG=$(printf %q "$MLOPS_IMAGE_TAG") deploy/production/deploy.sh"
