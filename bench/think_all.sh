#!/usr/bin/env bash
# The thinking experiment end to end, in two parts that each fit one run of the long-run lane:
#
#   for part in train curves; do
#     flock /tmp/cf-core0.lock taskset -c 0 env OMP_NUM_THREADS=1 PYTHONPATH=$PWD bench/think_all.sh $part
#   done
#
# train: a small model taught the tasks' traces (bench/think_train.py: world + traces -> pretrain ->
#        SFT), then a PRM and an ORM per task from its own labelled samples (`chatforge prefs prm`;
#        Game of 24: puzzles ranked 1-800 only)
# curves: accuracy against tokens generated on world age problems and on puzzles ranked 801-900
set -euo pipefail
RUN=${RUN:-runs/think}
PY=${PYTHON:-python}
SEEDS=${SEEDS:-0,1,2}
verifier() {  # task, out, [--outcome]
  $PY -m chatforge.cli prefs prm --model "$RUN/sft" --task "$1" --out "$2" ${3:-} --steps 150 --lr 3e-4 \
    --problems 600 --samples 4 --no-progress
}
curve() {  # task, extra flags
  $PY bench/think_curve.py --model "$RUN/sft" --prm "$RUN/prm_$1" --orm "$RUN/orm_$1" --task "$1" \
    --seeds "$SEEDS" --out "$RUN/report/$1" "${@:2}"
}
case "${1:?train or curves}" in
  train)
    $PY bench/think_train.py --out "$RUN" --pretrain-steps 1200 --sft-steps 400
    for task in world game24; do
      [ -f "$RUN/prm_$task/model.safetensors" ] || verifier $task "$RUN/prm_$task"
      [ -f "$RUN/orm_$task/model.safetensors" ] || verifier $task "$RUN/orm_$task" --outcome
    done ;;
  curves)
    curve game24 --ranks 801-900 --trees b1d4,b2d4,b4d4
    curve world --problems 60 --trees b1d4,b2d4 ;;
  *) echo "unknown part $1" >&2; exit 2 ;;
esac
