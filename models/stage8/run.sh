#!/usr/bin/env bash
# ScarNet stage 8 (issue 9): stage 7's run with one change, to measure it: a second city and sensor in the
# pairs made from one date. 30 % of the erasing, copy-paste and no-change draws come from Joplin's
# pre-disaster QuickBird-2 image and its 486 footprints (`train.footprints`), the rest from Santa Rosa as
# before. From the shipped checkpoint (stage 6 at step 4,000), constant 1e-4 (warmup 100), stage 7's mix,
# seed and shape (256² × 4, bf16, 1 thread), so stage 8 at step N is read against stage 7 at step N.
# Candidates, fixed before the run was scored: each 1,000-step checkpoint and the average of those so far.
# Step 2,000 ships (models/scarnet.pt; the card's Choosing what ships). Stopped at 2,250 (5,021 s) and at
# 3,500 (6,669 s, 2 runs), each time by a SIGTERM right after the state was written, by code from before a
# signal paused runs itself: the log has no pause records (a resume record at 2,250) and repeats no step.
# Resume after a stop: RESUME=--resume bash models/stage8/run.sh (THREADS=2 on an idle box;
# EXTRA="--set train.max_steps_this_run=N" stops after N steps with the state saved)
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
[ -f models/stage8/init_stage6_4000.pt ] || git show fc8559f:models/scarnet.pt > models/stage8/init_stage6_4000.pt  # stage 6 at step 4,000
exec .venv/bin/python -m pipeline.cli -v \
  --set train.init_from=models/stage8/init_stage6_4000.pt --set train.steps=6000 --set train.time_limit_min=null \
  --set train.schedule=constant --set train.crop=256 --set train.batch_size=4 --set train.lr=0.0001 \
  --set train.warmup_steps=100 \
  --set 'train.mix={santa: 0.2, whu: 0.1, joplin: 0.05, erase: 0.15, paste: 0.2, nochange: 0.1, synth: 0.2}' \
  --set 'train.footprints={xbd-joplin: 0.3}' \
  --set train.seed=20260408 --set train.threads=${THREADS:-1} --set train.val_every=1000 \
  --set train.checkpoint_every=250 --set train.log_path=models/stage8/train_log.jsonl \
  ${EXTRA:-} train --out models/stage8/scarnet.pt ${RESUME:-}
