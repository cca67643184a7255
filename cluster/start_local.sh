#!/usr/bin/env bash
# Start a single-node Ray head on this machine to run the pipelines through `ray job submit` the way
# the cluster runs them. Every service of the head (GCS :6379, raylet, object manager, agents, client
# server :10001, dashboard and job API) and every worker listens on 127.0.0.1 only: Ray's single-machine
# mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, exported below). Without it Ray resolves --node-ip-address
# 127.0.0.1 to the machine's address and listens on all interfaces. A head other machines join is a
# real cluster: cluster/ holds the KubeRay manifests for that.
#
#   cluster/start_local.sh [extra `ray start` flags, e.g. --num-cpus 4 --object-store-memory 1000000000]
#   cluster/stop_local.sh            # stops this head only
#
# The head runs in its own process group (setsid); its id is recorded in
# $AURORA_RAY_STATE_DIR/head.pgid so that stop_local.sh can stop exactly these processes instead of
# `ray stop`, which kills every Ray process on the machine.
#
# Environment:
#   AURORA_RAY_PORT (6379), AURORA_DASHBOARD_PORT (8265)  ports of the GCS and the dashboard / job API
#   AURORA_RAY_STATE_DIR (${TMPDIR:-/tmp}/aurora-ray-$UID) where head.pgid is kept
#   AURORA_RAY_BIN   the `ray` executable (default: .venv/bin/ray of the repo if present, else `ray`)
# A second head on the same machine also needs its own agent ports: pass --dashboard-agent-listen-port,
# --dashboard-agent-grpc-port, --metrics-export-port, --runtime-env-agent-port,
# --ray-client-server-port, --node-manager-port, --object-manager-port, --min/--max-worker-port.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${AURORA_RAY_STATE_DIR:-${TMPDIR:-/tmp}/aurora-ray-$(id -u)}"
PGID_FILE="$STATE_DIR/head.pgid"
RAY_PORT="${AURORA_RAY_PORT:-6379}"
DASHBOARD_PORT="${AURORA_DASHBOARD_PORT:-8265}"
if [[ -n "${AURORA_RAY_BIN:-}" ]]; then
  RAY_BIN="$AURORA_RAY_BIN"
elif [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then
  RAY_BIN="$REPO_ROOT/.venv/bin/ray"
else
  RAY_BIN="$(command -v ray || true)"
fi
[[ -n "$RAY_BIN" ]] || { echo "error: no 'ray' executable (pip install -e '.[dev]' first)" >&2; exit 1; }

mkdir -p "$STATE_DIR"
if [[ -s "$PGID_FILE" ]] && pgrep -g "$(cat "$PGID_FILE")" -f 'gcs_server|raylet' >/dev/null 2>&1; then
  echo "a head started by this script is already running (process group $(cat "$PGID_FILE"));" \
       "stop it with cluster/stop_local.sh" >&2
  exit 1
fi
rm -f "$PGID_FILE"

# Inherited by the raylet and so by every Ray worker and job driver of this head. The job
# entrypoint's `python` is looked up on this PATH: put the environment that holds ray first.
export PATH="$(dirname "$RAY_BIN"):$PATH"
export RAY_TRAIN_ENABLE_PRINT_PATCH="${RAY_TRAIN_ENABLE_PRINT_PATCH:-0}"  # else worker lines print twice
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # listen on 127.0.0.1 only (above); job drivers inherit it
if [[ -z "${DS_ACCELERATOR:-}" ]] && ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu  # no GPU here: keep DeepSpeed from guessing
fi

# setsid: a new session and process group whose id is the pid of the shell below; `ray start`
# leaves its daemons (gcs_server, raylet, dashboard, agents) in it when it returns.
setsid --wait bash -c 'echo $$ > "$0"; exec "$@"' "$PGID_FILE" \
  "$RAY_BIN" start --head \
  --node-ip-address 127.0.0.1 \
  --port "$RAY_PORT" \
  --dashboard-host 127.0.0.1 \
  --dashboard-port "$DASHBOARD_PORT" \
  --disable-usage-stats \
  "$@"

PGID="$(cat "$PGID_FILE")"
if ! pgrep -g "$PGID" -f gcs_server >/dev/null 2>&1; then
  echo "error: the head did not stay up (no gcs_server in process group $PGID)" >&2
  rm -f "$PGID_FILE"
  exit 1
fi

cat <<EOF

Ray head is up: GCS 127.0.0.1:$RAY_PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT
(process group $PGID, recorded in $PGID_FILE).

Submit a pipeline from the repository root (Ray 2.60 enables token auth on a new head; the job CLI
only sends the token from ~/.ray/auth_token when RAY_AUTH_MODE=token is set):

  cd $REPO_ROOT
  RAY_AUTH_MODE=token $RAY_BIN job submit --address http://127.0.0.1:$DASHBOARD_PORT \\
      --working-dir . -- python pipelines/grpo.py run.root=\$PWD/runs

  (or --runtime-env cluster/runtime_env.yaml instead of --working-dir .: same upload, plus excludes
  and env vars; run.root must be absolute: the job runs in a temporary copy of the checkout)

Follow it:  RAY_AUTH_MODE=token $RAY_BIN job logs --address http://127.0.0.1:$DASHBOARD_PORT -f <submission id>
Stop it:    cluster/stop_local.sh
EOF
