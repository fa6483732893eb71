#!/usr/bin/env bash
# Fine-tune ScarNet on a lent GPU from the training bundle (issue #9); see pipeline/model/gpu_train.py.
#
# 1. Here, on the CPU:  .venv/bin/scarwatch bundle --out .bundle     (about 38 MiB, ignored by git)
# 2. The device tool:   command "bash scripts/gpu_train.sh", carry [".bundle"], timeout_s 600
#    It runs the one line at the bottom: nothing to unpack or install (python3 there has torch,
#    numpy, scipy and PIL; pipeline/ is imported from the repository root). --minutes 8 of training
#    plus reading the bundle and four quick validations is about 8.5 minutes of the 10 a command may take.
# 3. Back here: $OUT holds scarnet.pt (threshold 0.5, uncalibrated), scarnet.best.pt (when a quick
#    validation beat the initial network), train_log.jsonl and summary.json. Calibrate and score it here:
#    scarwatch calibrate --model <files>/scarnet.pt --out models/<name>.pt; scarwatch evaluate --model ...
#
# Extra arguments are passed on (e.g. --batch 48 --crop 384 --workers 15 --lr 0.002); MINUTES overrides 8.
set -euo pipefail
: "${OUT:?OUT is the output folder; the device tool sets it}"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
df -h /dev/shm | tail -n 1 || true
PYTHONUNBUFFERED=1 python3 -m pipeline.model.gpu_train --bundle .bundle --out "$OUT" --minutes "${MINUTES:-8}" --init models/scarnet.pt "$@"
