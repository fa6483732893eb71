#!/usr/bin/env bash
# ScarNet stage 6 (issue 9): from stage 4 (the shipped checkpoint) at a low learning rate, WHU-CD at half
# its stage-5 weight, 6,000-step cosine schedule (resumable exactly), 256² crops, bf16, 1 thread.
# Resume after a stop: RESUME=--resume bash models/stage6/run.sh (THREADS=2 on an idle box;
# EXTRA="--set train.max_steps_this_run=N" stops after N steps with the state saved)
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
[ -f models/stage6/init_stage4.pt ] || cp models/scarnet.pt models/stage6/init_stage4.pt
exec .venv/bin/python -m pipeline.cli -v \
  --set train.init_from=models/stage6/init_stage4.pt --set train.steps=6000 --set train.time_limit_min=null \
  --set train.crop=256 --set train.batch_size=4 --set train.lr=0.0002 --set train.warmup_steps=100 \
  --set 'train.mix={santa: 0.2, whu: 0.1, joplin: 0.05, erase: 0.2, paste: 0.2, nochange: 0.1, synth: 0.15}' \
  --set train.seed=20260407 --set train.threads=${THREADS:-1} --set train.val_every=500 --set train.checkpoint_every=250 \
  --set train.log_path=models/stage6/train_log.jsonl \
  ${EXTRA:-} train --out models/stage6/scarnet.pt ${RESUME:-}
