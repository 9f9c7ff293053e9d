#!/usr/bin/env bash
# One device (an Ascend card, or this machine's CPU/GPU).
#   bash scripts/run_standalone.sh CONFIG DEVICE_ID finetune [knowlm finetune options, e.g. --data D --base B]
#   bash scripts/run_standalone.sh CONFIG DEVICE_ID predict  "prompt" [knowlm generate options]
# finetune checks the yaml before it builds anything; the log goes to $OUTPUT_DIR/log/standalone_<status>.log
# (OUTPUT_DIR defaults to ./output) as well as to the terminal.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash $0 CONFIG DEVICE_ID finetune|predict [options...]" >&2
  exit 2
fi
CONFIG=$1 DEVICE_ID=$2 RUN_STATUS=$3
shift 3
KNOWLM=${KNOWLM:-knowlm}
source "$(dirname "$0")/common.sh"
resolve_config "$CONFIG"
export DEVICE_ID RANK_ID=0 RANK_SIZE=1
LOG_DIR=${OUTPUT_DIR:-output}/log
mkdir -p "$LOG_DIR"
case $RUN_STATUS in
  finetune)
    "$KNOWLM" finetune --config "$CONFIG" "$@" 2>&1 | tee "$LOG_DIR/standalone_finetune.log" ;;
  predict)
    "$KNOWLM" generate --model "$CONFIG" "$@" 2>&1 | tee "$LOG_DIR/standalone_predict.log" ;;
  *)
    echo "run_standalone.sh: RUN_STATUS $RUN_STATUS: expected finetune or predict" >&2
    exit 2 ;;
esac
