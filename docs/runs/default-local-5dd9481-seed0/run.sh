#!/bin/bash
# session 44: the local loop's seed 0 at 5dd9481 (status lines every log_every steps or 20 s), on this
# machine's kdtw pretrain (teacher 75.10 / student 59.08 BLEU: the weights of run 13 and default-local-ba5067b-seed0)
set -u
cd /tmp/fresh44
echo "commit $(git rev-parse --short HEAD)"
echo "start local seed=0 $(date -u +%FT%TZ) $(date +%s)"
PYTHONUNBUFFERED=1 .venv/bin/python -m kdtw.cli train --local --overwrite seed=0 run_dir=/tmp/l44s0
echo "end local seed=0 $(date -u +%FT%TZ) $(date +%s) rc=$?"
