#!/usr/bin/env bash
# Trains the shipped models side by side on ONE GPU machine (each run is small enough that
# several share an H100 well), without Ray. This is how m2t_core/weights/ was produced;
# docs/models.md gives the figures. Usage (from the repo root, after building .traindata with
# `python -m pipeline.training.make_train_subset --out .traindata --budget-mb 56 --quality 90 --short-side 256 400`):
#
#   STEPS=12000 pipeline/training/train_shipped_models.sh start     # launch in the background
#   pipeline/training/train_shipped_models.sh status                 # last log line of each run
#   STEPS=12000 pipeline/training/train_shipped_models.sh resume     # continue after an interruption
#
# Rate points: lambda (weight of MSE on the 0..255 scale) as in CompressAI's quality ladder.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${STEPS:-12000}
RUNS=${RUNS:-runs}
WORKERS=${WORKERS:-3}
PY=${PY:-python3}
declare -A LAMBDA=([m2t-small-q1]=0.0018 [m2t-small-q2]=0.0067 [m2t-small-q3]=0.025 [m2t-small-q4]=0.07 [mt-small-q2]=0.0067)
declare -A CONFIG=([m2t-small-q1]=m2t-small [m2t-small-q2]=m2t-small [m2t-small-q3]=m2t-small [m2t-small-q4]=m2t-small [mt-small-q2]=mt-small)
NAMES=${NAMES:-"m2t-small-q1 m2t-small-q2 m2t-small-q3 m2t-small-q4 mt-small-q2"}

launch() {  # $1: extra flag (--resume or empty)
  mkdir -p "$RUNS"
  for name in $NAMES; do
    setsid nohup "$PY" jobs/train.py --config "configs/train/${CONFIG[$name]}.yaml" --no-ray $1 \
      --set model_id="$name" --set lmbda="${LAMBDA[$name]}" --set steps="$STEPS" \
      --set num_workers="$WORKERS" --set output_dir="$RUNS/$name" --set log_every="${LOG_EVERY:-100}" --set lr="${LR:-2.0e-4}" \
      > "$RUNS/$name.log" 2>&1 < /dev/null &
    echo "started $name (lambda ${LAMBDA[$name]}, $STEPS steps) -> $RUNS/$name.log"
  done
}

case "${1:-}" in
  start) launch "" ;;
  resume) launch "--resume" ;;
  status) for name in $NAMES; do echo "$name: $(grep -E 'step|val|error|Error' "$RUNS/$name.log" | tail -n 1)"; done ;;
  *) echo "usage: $0 start|resume|status" >&2; exit 2 ;;
esac
