#!/usr/bin/env bash
# ScarNet stage 9 (issue 9): stage 8 plus one change, to measure it against stage 8 step for step:
# shadow-change pairs (`mix.shadow`, 0.1 beside stage 8's weights): one crop whose buildings cast shadows
# under two suns, labelled no change. Against the shipped network's false flags on the full demo town,
# where the shadows of tall blocks shrink from one month to the next (sun higher in spring) and read as
# removed structures. Otherwise stage 8: from the shipped checkpoint (stage 6 at step 4,000), constant 1e-4
# (warmup 100), Joplin footprints at 30 % of the single-date draws, seed 20260408, 256² × 4, bf16, 1 thread.
# Candidates, fixed before the run was scored: each 1,000-step checkpoint and the average of those so far.
# Paused by a SIGTERM at step 1,174 after 2,789 s (1 run, beside stage 8), state saved; step 1,000 scored
# 0.719 weighted against stage 8's 0.721 at the same step (the card).
# Resume after a stop: RESUME=--resume bash models/stage9/run.sh (a SIGTERM pauses it with the state saved)
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
[ -f models/stage9/init_stage6_4000.pt ] || git show fc8559f:models/scarnet.pt > models/stage9/init_stage6_4000.pt  # stage 6 at step 4,000
exec .venv/bin/python -m pipeline.cli -v \
  --set train.init_from=models/stage9/init_stage6_4000.pt --set train.steps=6000 --set train.time_limit_min=null \
  --set train.schedule=constant --set train.crop=256 --set train.batch_size=4 --set train.lr=0.0001 \
  --set train.warmup_steps=100 \
  --set 'train.mix={santa: 0.2, whu: 0.1, joplin: 0.05, erase: 0.15, paste: 0.2, nochange: 0.1, shadow: 0.1, synth: 0.2}' \
  --set 'train.footprints={xbd-joplin: 0.3}' \
  --set train.seed=20260408 --set train.threads=${THREADS:-1} --set train.val_every=1000 \
  --set train.checkpoint_every=250 --set train.log_path=models/stage9/train_log.jsonl \
  ${EXTRA:-} train --out models/stage9/scarnet.pt ${RESUME:-}
