#!/bin/bash
# session 43: the local loop's seed 0 beside run 13 (same models), then seed 1 of the job and of the local loop
set -u
cd /tmp/fresh
git fetch -q /work/main main && git checkout -q FETCH_HEAD
echo "commit $(git rev-parse --short HEAD); models: this clone's kdtw pretrain of run 13"
for spec in "local 0" "job 1" "local 1"; do
  set -- $spec
  echo "start $1 seed=$2 $(date -u +%FT%TZ) $(date +%s)"
  if [ "$1" = local ]; then
    PYTHONUNBUFFERED=1 .venv/bin/kdtw train --local --overwrite seed=$2 run_dir=/tmp/l$2
  else
    PYTHONUNBUFFERED=1 .venv/bin/python jobs/train_pcl.py --overwrite seed=$2 run_dir=/tmp/j$2
  fi
  rc=$?
  echo "end $1 seed=$2 $(date -u +%FT%TZ) $(date +%s) rc=$rc"
done
