#!/bin/bash
# session 44: the job (jobs/train_pcl.py, the README's main command after `kdtw pretrain`) seed 0 at 5dd9481, on
# this machine's kdtw pretrain (teacher 75.10 / student 59.08 BLEU: run 13's weights), after the local loop's run
set -u
cd /tmp/fresh44
echo "commit $(git rev-parse --short HEAD)"
echo "start job seed=0 $(date -u +%FT%TZ) $(date +%s)"
PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/fresh44 .venv/bin/python jobs/train_pcl.py --overwrite seed=0 run_dir=/tmp/j44s0
echo "end job seed=0 $(date -u +%FT%TZ) $(date +%s) rc=$?"
