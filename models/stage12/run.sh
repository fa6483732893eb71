#!/usr/bin/env bash
# ScarNet stage 12 (issue 9): stage 11 (the shipped network grown to widths 16-32-64-128-256, 2.03 M
# parameters) from its state at step 4,014, with the learning rate annealed instead of held: cosine from
# 1e-4 (warmup 50) to 2 % over 2,000 steps. Why: every constant-rate run here swings by up to 0.03
# weighted between neighbouring 1,000-step checkpoints (stage 11: 0.745 at 3,000, 0.716 at 4,000), and an
# annealed end settles where the constant rate only wanders. Otherwise stage 11: stage 8's mix, Joplin
# footprints at 30 %, 256² × 4, 1 thread; train.amp auto (fp32 on a CPU without native bf16); seed
# 20260412. Each 500-step checkpoint is kept (`train.keep_every`). Candidates, fixed before the run is
# scored: the 1,000- and 2,000-step checkpoints and their average; the rule of the card.
# Resume after a stop: RESUME=--resume bash models/stage12/run.sh (a SIGTERM pauses it with the state saved)
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
[ -f models/stage12/init_stage11_4014.pt ] || git show abacd4c:models/stage11/scarnet.pt > models/stage12/init_stage11_4014.pt
exec .venv/bin/python -m pipeline.cli -v \
  --set train.init_from=models/stage12/init_stage11_4014.pt \
  --set 'train.arch_kwargs={widths: [16, 32, 64, 128, 256]}' --set train.steps=2000 --set train.time_limit_min=null \
  --set train.schedule=cosine --set train.crop=256 --set train.batch_size=4 --set train.lr=0.0001 \
  --set train.warmup_steps=50 \
  --set 'train.mix={santa: 0.2, whu: 0.1, joplin: 0.05, erase: 0.15, paste: 0.2, nochange: 0.1, synth: 0.2}' \
  --set 'train.footprints={xbd-joplin: 0.3}' \
  --set train.seed=20260412 --set train.threads=${THREADS:-1} --set train.val_every=500 \
  --set train.checkpoint_every=250 --set train.keep_every=500 --set train.log_path=models/stage12/train_log.jsonl \
  ${EXTRA:-} train --out models/stage12/scarnet.pt ${RESUME:-}
