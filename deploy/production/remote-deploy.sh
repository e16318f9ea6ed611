#!/usr/bin/env bash
# From CI (release.yml): run deploy.sh on one environment's Docker host over SSH, at the released tag.
# Needs DEPLOY_SSH_KEY, DEPLOY_KNOWN_HOSTS (the host keys to trust, see remote.sh), DEPLOY_HOST
# (user@host), DEPLOY_PATH (the repository checkout there, with deploy/production/secrets/
# provisioned by an operator), REGISTRY and MLOPS_IMAGE_TAG.
set -euo pipefail
: "${REGISTRY:?set REGISTRY}" "${MLOPS_IMAGE_TAG:?set MLOPS_IMAGE_TAG}"
. "$(dirname "$0")/remote.sh"
# printf %q quotes each value for the remote shell.
remote "cd $(printf %q "$DEPLOY_PATH") && git fetch --tags --force origin && git checkout --force $(printf %q "$MLOPS_IMAGE_TAG") \
   && REGISTRY=$(printf %q "$REGISTRY") MLOPS_IMAGE_TAG=$(printf %q "$MLOPS_IMAGE_TAG") deploy/production/deploy.sh"
