#!/usr/bin/env bash
# ScarNet stage 5 (issue 9): from stage 4, step schedule (resumable exactly), 256² crops, bf16, 1 thread.
# Resume after a stop: RESUME=--resume bash models/stage5/run.sh (THREADS=2 on an idle box;
# EXTRA="--set train.max_steps_this_run=N" stops after N steps with the state saved)
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
exec .venv/bin/python -m pipeline.cli -v \
  --set train.init_from=models/stage5/init_stage4.pt --set train.steps=12000 --set train.time_limit_min=null \
  --set train.crop=256 --set train.batch_size=4 --set train.lr=0.0006 --set train.warmup_steps=100 \
  --set train.seed=20260406 --set train.threads=${THREADS:-1} --set train.val_every=500 --set train.checkpoint_every=250 \
  --set train.log_path=models/stage5/train_log.jsonl \
  ${EXTRA:-} train --out models/stage5/scarnet.pt ${RESUME:-}
