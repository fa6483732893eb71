#!/usr/bin/env bash
# ScarNet stage 15 (issue 9): U-Net border weights against merged houses. Object F1 is the largest gap to
# the targets (levir-dev 0.26 against 0.45), and of the 39 new buildings of levir-dev the shipped network
# hits 9 at IoU >= 0.5, merges 12 with a neighbour into one component, covers 5 partly and misses 13
# (the card table's object fates, 8-connected components at its threshold 0.20; this comment was corrected
# after the run started, from a first count on 4-connected true objects: 41, 9 / 12 / 5 / 15). Splitting the components afterwards (distance-transform
# watershed) was measured and not adopted: it splits long buildings (the demo town's removed objects, 0.95
# -> 0.87) and, on the WHU-CD training pairs, Christchurch's large irregular roofs (0.74 -> 0.62 with
# absolute h-maxima of 3 px). This run teaches the network the gaps instead: `train.separation_weight` 10 and
# `train.separation_sigma_px` 5, the values of Ronneberger et al. (2015), not tuned here; the background
# between two labelled structures weighs up to 11 in the BCE.
# Otherwise stage 8's run from the shipped network (stage 8 at step 2,000): its mix, constant 1e-4 (warmup
# 100), Joplin footprints at 30 % of the single-date draws, 256² × 4, 1 thread, `train.amp: auto` (fp32 on
# a CPU without native bf16); seed 20260415.
# Candidates, fixed before the run was scored: each kept checkpoint (every 500 steps) alone and the uniform
# soup {shipped, stage 15 at step 1,000} (`scarwatch average`, BatchNorm over 100 batches, seed 0); the
# card's rule, then the full demo town's flags; object F1 (the table's and the flag-like) reported beside.
# Resume after a stop: RESUME=--resume bash models/stage15/run.sh (a SIGTERM pauses it with the state saved)
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
[ -f models/stage15/init_stage8_2000.pt ] || git show c0850f4:models/scarnet.pt > models/stage15/init_stage8_2000.pt  # shipped
exec .venv/bin/python -m pipeline.cli -v \
  --set train.init_from=models/stage15/init_stage8_2000.pt --set train.steps=6000 --set train.time_limit_min=null \
  --set train.schedule=constant --set train.crop=256 --set train.batch_size=4 --set train.lr=0.0001 \
  --set train.warmup_steps=100 \
  --set 'train.mix={santa: 0.2, whu: 0.1, joplin: 0.05, erase: 0.15, paste: 0.2, nochange: 0.1, synth: 0.2}' \
  --set 'train.footprints={xbd-joplin: 0.3}' \
  --set train.separation_weight=10 --set train.separation_sigma_px=5 \
  --set train.seed=20260415 --set train.threads=${THREADS:-1} --set train.val_every=500 \
  --set train.checkpoint_every=100 --set train.keep_every=500 --set train.log_path=models/stage15/train_log.jsonl \
  ${EXTRA:-} train --out models/stage15/scarnet.pt ${RESUME:-}
