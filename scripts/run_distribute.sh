#!/usr/bin/env bash
# Several devices of one server, two ways:
#   bash scripts/run_distribute.sh RANK_TABLE_FILE CONFIG [START,END] RUN_STATUS [knowlm options]
#       classic HCCL launch: one process per device START..END-1 with RANK_TABLE_FILE, RANK_SIZE, RANK_ID and
#       DEVICE_ID set (write the table with `knowlm rank-table --devices START-END`)
#   bash scripts/run_distribute.sh msrun CONFIG WORKER_NUM RUN_STATUS [knowlm options]
#       MindSpore's msrun: no rank table; also runs data-parallel on CPU (MindSpore's own collectives)
# RUN_STATUS is finetune. Options after it go to `knowlm finetune` (--data, --base, --set KEY=VALUE ...).
# Each rank logs to $OUTPUT_DIR/log/rank_<id>.log (OUTPUT_DIR defaults to ./output). With DRY_RUN=1 the
# per-rank environment and command are printed instead of run.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: bash $0 RANK_TABLE_FILE|msrun CONFIG [START,END]|WORKER_NUM finetune [options...]" >&2
  exit 2
fi
MODE=$1 CONFIG=$2 DEVICES=$3 RUN_STATUS=$4
shift 4
KNOWLM=${KNOWLM:-knowlm}
source "$(dirname "$0")/common.sh"
resolve_config "$CONFIG"
[ "$RUN_STATUS" = finetune ] || { echo "run_distribute.sh: RUN_STATUS $RUN_STATUS: expected finetune" >&2; exit 2; }
LOG_DIR=${OUTPUT_DIR:-output}/log
mkdir -p "$LOG_DIR"
check_args "$@"

if [ "$MODE" = msrun ]; then
  WORKERS=$DEVICES
  "$KNOWLM" check-config "$CONFIG" --devices "$WORKERS" ${CHECK_ARGS[@]+"${CHECK_ARGS[@]}"}
  BIN=$(dirname "$(command -v "$KNOWLM")")
  # find_spec locates the package without importing it (MindFormers prints warnings on import).
  CLI=$("$BIN/python" -c 'import importlib.util as u; print(u.find_spec("knowlm").submodule_search_locations[0])')/cli.py
  CMD=(msrun --worker_num="$WORKERS" --local_worker_num="$WORKERS" --master_port="${MASTER_PORT:-8118}"
       --log_dir="$LOG_DIR" --join=True --cluster_time_out="${CLUSTER_TIME_OUT:-600}"
       "$CLI" finetune --config "$CONFIG" "$@")
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "${CMD[*]}"; exit 0; fi
  # msrun starts "python <script>": the workers must find this environment's python first.
  PATH="$BIN:$PATH" "${CMD[@]}"
  exit $?
fi

RANK_TABLE_FILE=$(realpath "$MODE")
[ -f "$RANK_TABLE_FILE" ] || { echo "run_distribute.sh: $MODE: rank table not found" >&2; exit 2; }
RANGE=${DEVICES//[\[\] ]/}
START=${RANGE%,*} END=${RANGE#*,}
if ! [[ $START =~ ^[0-9]+$ && $END =~ ^[0-9]+$ ]] || [ "$START" -ge "$END" ]; then
  echo "run_distribute.sh: device range $DEVICES: expected [START,END] with START < END" >&2
  exit 2
fi
RANK_SIZE=$((END - START))
"$KNOWLM" check-config "$CONFIG" --devices "$RANK_SIZE" ${CHECK_ARGS[@]+"${CHECK_ARGS[@]}"}
PIDS=()
for ((device = START; device < END; device++)); do
  rank=$((device - START))
  ENVS=(RANK_TABLE_FILE="$RANK_TABLE_FILE" RANK_SIZE="$RANK_SIZE" RANK_ID="$rank" DEVICE_ID="$device")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "rank $rank: ${ENVS[*]} $KNOWLM finetune --config $CONFIG $*"
    continue
  fi
  env "${ENVS[@]}" "$KNOWLM" finetune --config "$CONFIG" "$@" > "$LOG_DIR/rank_$rank.log" 2>&1 &
  PIDS+=($!)
done
status=0
for pid in "${PIDS[@]}"; do wait "$pid" || status=1; done
[ $status = 0 ] || echo "run_distribute.sh: a rank failed; see $LOG_DIR/rank_*.log" >&2
exit $status
