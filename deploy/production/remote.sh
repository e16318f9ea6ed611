# Sourced by remote-deploy.sh and remote-retrain.sh (CI): `remote <command>` runs one command on
# DEPLOY_HOST (user@host) over SSH with the key in DEPLOY_SSH_KEY, trusting only the host keys in
# DEPLOY_KNOWN_HOSTS: known_hosts lines stored as a secret of the environment, e.g. the output of
# `ssh-keyscan -t ed25519 <host>` checked against `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`
# on the host itself. A host whose key is not listed is refused, never learned.
: "${DEPLOY_SSH_KEY:?set DEPLOY_SSH_KEY}" "${DEPLOY_HOST:?set DEPLOY_HOST}" "${DEPLOY_PATH:?set DEPLOY_PATH}"
: "${DEPLOY_KNOWN_HOSTS:?set DEPLOY_KNOWN_HOSTS (the host keys to trust, known_hosts format)}"
ssh_dir="$(mktemp -d)"  # 0700: the key and the pinned host keys, removed on exit
trap 'rm -rf "$ssh_dir"' EXIT
printf '%s\n' "$DEPLOY_SSH_KEY" >"$ssh_dir/key"
printf '%s\n' "$DEPLOY_KNOWN_HOSTS" >"$ssh_dir/known_hosts"
chmod 600 "$ssh_dir/key"

remote() {  # command (one string, already quoted for the remote shell)
  ssh -i "$ssh_dir/key" -o BatchMode=yes -o IdentitiesOnly=yes \
    -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$ssh_dir/known_hosts" -o GlobalKnownHostsFile=/dev/null \
    "$DEPLOY_HOST" "$1"
}
