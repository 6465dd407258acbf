#!/bin/sh
# AdaGrad screening on Pong (docs/RESULTS.md, "AdaGrad on Pong"): the dev preset with the shard's
# optimiser switched to AdaGrad, one run per "LR G0" pair, one after the other (each takes both cores).
# Usage: sh docs/adagrad_screen.sh [SECONDS] "LR G0 [WARMUP]" ["LR G0 [WARMUP]" ...]
#   WARMUP: ps.lr_warmup_updates (the shard's lr ramps linearly over its first WARMUP updates; default 0)
#   2026-12-03 ran: sh docs/adagrad_screen.sh 2700 "0.03 1e-6" "0.05 2e-4"          (A, B)
#   then, from the accumulator profile:  sh docs/adagrad_screen.sh 2700 "0.01 1e-10" "0.003 1e-12"   (C, D)
#   then (late steps of Adam's size):    sh docs/adagrad_screen.sh 2520 "0.03 1e-10"     (E)
#   2026-12-04, with the lr ramp:        sh docs/adagrad_screen.sh 4800 "0.03 1e-10 20000"   (F)
#                                        sh docs/adagrad_screen.sh 2460 "0.01 1e-10 20000"   (G)
#   2026-12-06:                          sh docs/adagrad_screen.sh 6900 "0.02 1e-10 20000"   (H)
#   A run stopped early resumes from its directory: gorila-zmq dev --duration S run.run_dir=RUN_DIR
set -e
DUR=${1:-2700}
shift
for spec in "$@"; do
  set -- $spec
  warm=${3:-0}
  rd=runs/adagrad-screen-lr$1-g0$2
  [ "$warm" = 0 ] || rd=$rd-warm$warm
  echo "$(date -u +%T) lr=$1 G0=$2 warmup=$warm -> $rd"
  ${GORILA:-.venv/bin/gorila-zmq} dev --preset dev --duration "$DUR" run.run_dir="$rd" \
    ps.optimizer=adagrad ps.lr="$1" ps.initial_accumulator="$2" ps.lr_warmup_updates="$warm" eval.interval_s=300 eval.episodes=5 > "$rd.log" 2>&1
  ${PYTHON:-.venv/bin/python} docs/adagrad_steps.py "$rd" > "$rd.steps.md" || true
done
