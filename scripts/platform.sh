#!/usr/bin/env bash
# Start or stop the long-running local platform on loopback: Dagster webserver and daemon
# (`dagster dev`, so sensors and schedules run), the MLflow UI, and the Ray head with Serve.
# Each service writes its pid to data/run/ and its log to data/logs/; `down` stops only those.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${BIN:-$PWD/.venv/bin}"
RUN_DIR=data/run
LOG_DIR=data/logs
DAGSTER_PORT="${DAGSTER_PORT:-3000}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
# Links between the UIs: Dagster metadata -> MLflow runs and versions, MLflow runs -> Dagster runs.
export MLFLOW_UI_URL="${MLFLOW_UI_URL:-http://127.0.0.1:$MLFLOW_PORT}"
export MLOPS_DAGSTER_UI_URL="${MLOPS_DAGSTER_UI_URL:-http://127.0.0.1:$DAGSTER_PORT}"
mkdir -p "$RUN_DIR" "$LOG_DIR" "${DAGSTER_HOME:?DAGSTER_HOME must be set (the Makefile sets it)}"
[ -s "$DAGSTER_HOME/dagster.yaml" ] || cp deploy/local/dagster.yaml "$DAGSTER_HOME/dagster.yaml"  # freshness on

alive() { [ -f "$RUN_DIR/$1.pid" ] && kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }

start() {  # name, command...
  local name=$1; shift
  if alive "$name"; then
    echo "$name already running (pid $(cat "$RUN_DIR/$name.pid"))"
    return
  fi
  # A shell's background job starts with SIGINT/SIGTERM ignored, and an ignored signal stays
  # ignored across exec: restore the defaults so `down` can stop the service gracefully.
  setsid "$BIN/python" -c 'import os, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT): signal.signal(s, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' "$@" >"$LOG_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN_DIR/$name.pid"
  echo "started $name (pid $!, log $LOG_DIR/$name.log)"
}

stop() {  # name
  local name=$1
  if alive "$name"; then
    # The whole process group: dagster dev and mlflow start children of their own.
    local pgid
    pgid=$(cat "$RUN_DIR/$name.pid")
    # SIGINT is dagster dev's and uvicorn's graceful stop (Ctrl-C).
    kill -INT -- "-$pgid" 2>/dev/null || kill -INT "$pgid"
    # Give a graceful shutdown 30 s, then make sure nothing of the group is left.
    for _ in $(seq 60); do
      kill -0 -- "-$pgid" 2>/dev/null || break
      sleep 0.5
    done
    kill -TERM -- "-$pgid" 2>/dev/null && sleep 2
    kill -KILL -- "-$pgid" 2>/dev/null || true
    echo "stopped $name"
  fi
  rm -f "$RUN_DIR/$name.pid"
}

mlflow_store() {
  "$BIN/python" -c "from mlops_assets.settings import load_settings as s; x = s(); print(x.mlflow_tracking_uri, x.mlflow_artifact_root)"
}

case "${1:-}" in
  up)
    "$BIN/python" -m mlops_assets.tools.ray_cluster up
    "$BIN/mlops-assets" serve restore || echo "serving of the champion not restored (see above); the rest of the platform starts anyway" >&2
    read -r tracking artifacts < <(mlflow_store)
    mkdir -p "$("$BIN/python" -c "from mlops_assets.settings import load_settings as s; import pathlib; print(pathlib.Path(s().data_url) / 'mlflow')")"
    start mlflow "$BIN/mlflow" server --backend-store-uri "$tracking" --default-artifact-root "$artifacts" \
      --host 127.0.0.1 --port "$MLFLOW_PORT"
    start dagster "$BIN/dagster" dev -w workspace.yaml --host 127.0.0.1 --port "$DAGSTER_PORT"
    echo "Dagster UI: $MLOPS_DAGSTER_UI_URL   MLflow UI: $MLFLOW_UI_URL"
    ;;
  down)
    stop dagster
    stop mlflow
    "$BIN/python" -m mlops_assets.tools.ray_cluster down
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
