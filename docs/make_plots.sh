#!/bin/sh
# Every learning-curve plot in docs/, made with `gorila-zmq plot` from the evaluations kept beside it.
# Run from the repository root: sh docs/make_plots.sh
set -e
P="${GORILA:-.venv/bin/gorila-zmq} plot"
CLEANRL=docs/cleanrl_pong_curve.csv:"CleanRL DQN, this kind of box (training returns)"
PAPER=docs/drqv2_paper_cartpole_swingup.csv:"DrQ-v2 paper, 10 seeds"
$P docs/pong_90min_evaluations.jsonl -o docs/pong_90min.png --hline=-20.7:random --title "Pong, run 1 (AdaGrad, G0 0.1)"
$P docs/pong_run2_evaluations.jsonl -o docs/pong_run2.png --hline=-20.7:random --reference "$CLEANRL" --title "Pong, run 2 (AdaGrad lr 0.01)"
$P docs/pong_run3_evaluations.jsonl -o docs/pong_run3.png --hline=-20.7:random --reference "$CLEANRL" --title "Pong, run 3 (Adam lr 1e-4)"
$P docs/drqv2_cartpole_swingup_evaluations.jsonl -o docs/drqv2_cartpole_swingup.png --hline=51.1:"uniform random" --reference "$PAPER"
$P docs/drqv2_cartpole_swingup_reg_evaluations.jsonl -o docs/drqv2_cartpole_swingup_reg.png --hline=51.1:"uniform random" --reference "$PAPER" --title "cartpole_swingup, pre-tanh penalty 1e-3"
$P docs/adagrad_screen_lr0.03_g0_1e-6_evaluations.jsonl docs/adagrad_screen_lr0.05_g0_2e-4_evaluations.jsonl \
   docs/adagrad_screen_lr0.01_g0_1e-10_evaluations.jsonl docs/adagrad_screen_lr0.003_g0_1e-12_evaluations.jsonl \
   docs/adagrad_screen_lr0.03_g0_1e-10_evaluations.jsonl \
   docs/adagrad_screen_lr0.03_g0_1e-10_warm20000_livelocked_evaluations.jsonl \
   docs/adagrad_screen_lr0.03_g0_1e-10_warm20000_evaluations.jsonl \
   docs/adagrad_screen_lr0.01_g0_1e-10_warm20000_evaluations.jsonl \
   docs/adagrad_screen_lr0.02_g0_1e-10_warm20000_evaluations.jsonl \
   docs/pong_run3_evaluations.jsonl -o docs/adagrad_screens.png --no-mean --max-frames 1.2e6 --hline=-20.7:random \
   --label "A: AdaGrad lr 0.03, G0 1e-6" --label "B: AdaGrad lr 0.05, G0 2e-4" \
   --label "C: AdaGrad lr 0.01, G0 1e-10" --label "D: AdaGrad lr 0.003, G0 1e-12" --label "E: AdaGrad lr 0.03, G0 1e-10" \
   --label "F (livelocked at 0.61 M): E + lr warm-up 20 K" --label "F: E + lr warm-up 20 K updates" \
   --label "G: AdaGrad lr 0.01, G0 1e-10, lr warm-up 20 K" \
   --label "H: AdaGrad lr 0.02, G0 1e-10, lr warm-up 20 K" \
   --label "run 3: Adam lr 1e-4" \
   --title "Pong: AdaGrad screens against Adam, first 1.2 M frames"
$P docs/adagrad_screen_lr0.03_g0_1e-10_warm20000_evaluations.jsonl docs/adagrad_screen_lr0.02_g0_1e-10_warm20000_evaluations.jsonl \
   docs/pong_run3_evaluations.jsonl -o docs/adagrad_warmup.png \
   --no-mean --hline=-20.7:random --reference "$CLEANRL" \
   --label "AdaGrad lr 0.03, G0 1e-10, lr warm-up 20 K updates (F)" \
   --label "AdaGrad lr 0.02, G0 1e-10, lr warm-up 20 K updates (H)" --label "run 3: Adam lr 1e-4" \
   --title "Pong: AdaGrad with a warm-up against Adam"
$P docs/pong_run3_evaluations.jsonl docs/pong_dev_seed1_evaluations.jsonl -o docs/pong_dev_seeds.png --hline=-20.7:random \
   --reference "$CLEANRL" --label "run 3 (seed 0, 2026-11-26)" --label "seed 1 (2026-12-06)" \
   --title "Pong, dev preset (Adam lr 1e-4): two seeds, mean and spread"
