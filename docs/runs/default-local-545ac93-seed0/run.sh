#!/bin/bash
cd /tmp/fresh
echo "commit $(git rev-parse --short HEAD) (the code of 9dcf302, the profile of 7601684); models: this clone's kdtw pretrain of run 4"
echo "start $(date -u +%FT%TZ) $(date +%s)"
PYTHONUNBUFFERED=1 .venv/bin/kdtw train --local --overwrite seed=0 run_dir=/tmp/l0
rc=$?
echo "end $(date -u +%FT%TZ) $(date +%s) rc=$rc"
