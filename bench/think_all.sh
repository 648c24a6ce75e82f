#!/usr/bin/env bash
# The thinking experiment end to end, in three parts that each fit one run of the long-run lane:
#
#   for part in train game24 world; do
#     flock /tmp/cf-core0.lock taskset -c 0 env OMP_NUM_THREADS=1 PYTHONPATH=$PWD bench/think_all.sh $part
#   done
#
# train: a small model taught the tasks' traces (bench/think_train.py: world + traces -> pretrain ->
#        SFT), then the world task's PRM and ORM from its own labelled samples (`chatforge prefs prm`)
# game24: the PRM and ORM on puzzles ranked 1-800, then the curve on puzzles ranked 801-900
# world: the curve on world age problems (accuracy against tokens generated, every strategy)
#
# The Game-of-24 specialist (G24=runs/g24), one part per step, on one core each:
#   g24-train: a model taught every correct trace of puzzles ranked 1-800 (bench/think_train.py --task
#              game24), then its PRM from program-labelled steps (4 reference traces per puzzle with
#              program-made slips and dead ends, 8 own samples per puzzle cut at their first wrong step)
#              and its ORM from the same kinds of whole answers (right beats wrong)
#   g24-curve: the curve on puzzles ranked 801-900, one run per sampling seed (SEEDS), then pooled;
#              temperature 0.5, chosen on 40 puzzles of ranks 1-800 kept out of training (per-sample
#              accuracy 24.7% against 17.8% at 0.8, pass@8 70% against 65%)
set -euo pipefail
RUN=${RUN:-runs/think}
PY=${PYTHON:-python}
SEEDS=${SEEDS:-0,1,2}
verifier() {  # task, out, [--outcome]
  $PY -m chatforge.cli prefs prm --model "$RUN/sft" --task "$1" --out "$2" ${3:-} --steps 150 --lr 3e-4 \
    --problems 600 --samples 4 --no-progress --resume
}
curve() {  # task, extra flags
  $PY bench/think_curve.py --model "$RUN/sft" --prm "$RUN/prm_$1" --orm "$RUN/orm_$1" --task "$1" \
    --seeds "$SEEDS" --out "$RUN/report/$1" "${@:2}"
}
verifiers() {  # task: its PRM and ORM, unless already trained
  [ -f "$RUN/prm_$1/model.safetensors" ] || verifier "$1" "$RUN/prm_$1"
  [ -f "$RUN/orm_$1/model.safetensors" ] || verifier "$1" "$RUN/orm_$1" --outcome
}
G24=${G24:-runs/g24}
case "${1:?train, game24, world, g24-train or g24-curve}" in
  g24-train)
    $PY bench/think_train.py --task game24 --out "$G24" --traces-per-puzzle 40 --shuffled 1 \
      --pretrain-steps "${G24_STEPS:-2400}" --sft-steps 150
    [ -f "$G24/prm/model.safetensors" ] || $PY -m chatforge.cli prefs prm --model "$G24/sft" \
      --task game24 --out "$G24/prm" --steps 600 --lr 3e-4 --samples 8 --refs 4 \
      --set eval_every=150 --no-progress --resume
    [ -f "$G24/orm/model.safetensors" ] || $PY -m chatforge.cli prefs prm --model "$G24/sft" \
      --task game24 --out "$G24/orm" --outcome --steps 600 --lr 3e-4 --samples 8 --refs 4 \
      --set eval_every=150 --no-progress --resume ;;
  g24-curve)
    dirs=()
    for s in ${SEEDS//,/ }; do
      $PY bench/think_curve.py --model "$G24/sft" --prm "$G24/prm" --orm "$G24/orm" --task game24 --ranks 801-900 \
        --budgets 1,2,4,8,16 --trees b1d4,b2d4,b3d4,b5d4 --temperature 0.5 --seeds "$s" \
        --out "$G24/report/game24_s$s"
      dirs+=("$G24/report/game24_s$s")
    done
    $PY bench/think_curve.py --merge "${dirs[@]}" --out "$G24/report/game24" ;;
  train)
    $PY bench/think_train.py --out "$RUN" --pretrain-steps 1200 --sft-steps 400
    verifiers world ;;
  game24)  # then the world curve in what is left of the lane's 15 minutes (it writes after each seed)
    verifiers game24
    curve game24 --ranks 801-900 --trees b1d4,b2d4,b3d4
    curve world --problems 60 --trees b1d4,b2d4 ;;
  world)
    verifiers world
    curve world --problems 60 --trees b1d4,b2d4 ;;
  *) echo "unknown part $1" >&2; exit 2 ;;
esac
