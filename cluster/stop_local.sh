#!/usr/bin/env bash
# Stop the Ray head started by cluster/start_local.sh, and only it: every process of its process
# group and their descendants (job drivers may run in sessions of their own), by id.
# Other Ray instances on this machine are left alone (unlike `ray stop`).
set -euo pipefail

STATE_DIR="${AURORA_RAY_STATE_DIR:-${TMPDIR:-/tmp}/aurora-ray-$(id -u)}"
PGID_FILE="$STATE_DIR/head.pgid"
GRACE_S="${AURORA_RAY_STOP_GRACE_S:-15}"  # gcs_server can take this long to go on SIGTERM

if [[ ! -s "$PGID_FILE" ]]; then
  echo "no head recorded in $PGID_FILE: nothing to stop"
  exit 0
fi
PGID="$(cat "$PGID_FILE")"
[[ "$PGID" =~ ^[0-9]+$ && "$PGID" -gt 1 ]] || { echo "error: bad process group id in $PGID_FILE" >&2; exit 1; }

# The live processes of the group plus all their descendants, as "pid" lines (zombies, which only
# wait to be reaped, are left out).
tree_pids() {
  ps -eo pid=,ppid=,pgid=,stat= | awk -v g="$1" '
    $4 ~ /^Z/ { next }
    { pid[NR] = $1; ppid[NR] = $2; if ($3 == g) keep[$1] = 1 }
    END {
      changed = 1
      while (changed) {
        changed = 0
        for (i = 1; i <= NR; i++)
          if (!(pid[i] in keep) && (ppid[i] in keep)) { keep[pid[i]] = 1; changed = 1 }
      }
      for (p in keep) print p
    }'
}

if [[ -z "$(tree_pids "$PGID")" ]]; then
  echo "process group $PGID has no processes left; forgetting it"
  rm -f "$PGID_FILE"
  exit 0
fi
# Guard against a recycled id: the group must still be a Ray head.
if ! pgrep -g "$PGID" -f 'gcs_server|raylet' >/dev/null 2>&1; then
  echo "error: process group $PGID is not a Ray head any more; not signalling it ($PGID_FILE kept)" >&2
  exit 1
fi

mapfile -t PIDS < <(tree_pids "$PGID")
echo "stopping Ray head (process group $PGID, ${#PIDS[@]} processes)"
kill -TERM "${PIDS[@]}" 2>/dev/null || true

deadline=$((SECONDS + GRACE_S))
alive() {  # any of PIDS still running (not a zombie)?
  local p st
  for p in "${PIDS[@]}"; do
    st="$(ps -o stat= -p "$p" 2>/dev/null)" || continue
    [[ "$st" == Z* ]] || return 0
  done
  return 1
}
while alive && (( SECONDS < deadline )); do sleep 0.5; done
if alive || [[ -n "$(tree_pids "$PGID")" ]]; then
  echo "some processes outlived SIGTERM for ${GRACE_S}s; sending SIGKILL"
  mapfile -t LATE < <(tree_pids "$PGID")  # anything spawned meanwhile
  for p in "${PIDS[@]}" "${LATE[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
fi
rm -f "$PGID_FILE"
echo "stopped"
