#!/usr/bin/env bash
# ScarNet stage 5 (issue 9): from stage 4, step schedule (resumable exactly), 256² crops, bf16, 1 thread.
# Resume after a stop: RESUME=--resume bash models/stage5/run.sh
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
exec .venv/bin/python -m pipeline.cli -v \
  --set train.init_from=models/stage5/init_stage4.pt --set train.steps=12000 --set train.time_limit_min=null \
  --set train.crop=256 --set train.batch_size=4 --set train.lr=0.0006 --set train.warmup_steps=100 \
  --set train.seed=20260406 --set train.threads=1 --set train.val_every=500 --set train.checkpoint_every=250 \
  --set train.log_path=models/stage5/train_log.jsonl \
  train --out models/stage5/scarnet.pt ${RESUME:-}
