#!/usr/bin/env bash
# ScarNet stage 7 (issue 9): from the shipped checkpoint (stage 6 at step 4,000), a constant learning rate
# of 1e-4 for 6,000 steps (warmup 100), so that checkpoints every 1,000 steps can be averaged
# (`scarwatch average`: stochastic weight averaging) instead of one being picked from a decaying schedule,
# where levir-dev swung by up to 0.085 between neighbours. Demo town back at its stage-4 share (20 %),
# footprint erasing down to 15 %. 256² × 4, bf16, 1 thread, seed 20260408.
# Candidates, fixed before the run was scored: the average of the checkpoints every 1,000 steps so far, and
# the last of them alone. Stopped at step 3,000 and resumed to 4,000 (max_steps_this_run=1000); the log
# repeats steps 3,000-3,050, which ran before the first stop (a SIGTERM, after the state at 3,000).
# Resume after a stop: RESUME=--resume bash models/stage7/run.sh (THREADS=2 on an idle box;
# EXTRA="--set train.max_steps_this_run=N" stops after N steps with the state saved)
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
[ -f models/stage7/init_stage6_4000.pt ] || git show fc8559f:models/scarnet.pt > models/stage7/init_stage6_4000.pt  # stage 6 at step 4,000
exec .venv/bin/python -m pipeline.cli -v \
  --set train.init_from=models/stage7/init_stage6_4000.pt --set train.steps=6000 --set train.time_limit_min=null \
  --set train.schedule=constant --set train.crop=256 --set train.batch_size=4 --set train.lr=0.0001 \
  --set train.warmup_steps=100 \
  --set 'train.mix={santa: 0.2, whu: 0.1, joplin: 0.05, erase: 0.15, paste: 0.2, nochange: 0.1, synth: 0.2}' \
  --set train.seed=20260408 --set train.threads=${THREADS:-1} --set train.val_every=1000 \
  --set train.checkpoint_every=250 --set train.log_path=models/stage7/train_log.jsonl \
  ${EXTRA:-} train --out models/stage7/scarnet.pt ${RESUME:-}
