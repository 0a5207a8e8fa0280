#!/bin/bash
# The README's main command on a fresh clone, timed part by part (date +%s).
set -u
rm -rf /tmp/fresh2 && git clone -q /work/main /tmp/fresh2 && cd /tmp/fresh2
git log --oneline -1
t0=$(date +%s)
python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 > /tmp/fresh2_pip.log 2>&1 && pip install -e . >> /tmp/fresh2_pip.log 2>&1
rc=$?; t1=$(date +%s); echo "SETUP rc=$rc $((t1-t0)) s"
PYTHONUNBUFFERED=1 kdtw pretrain; rc=$?; t2=$(date +%s); echo "PRETRAIN rc=$rc $((t2-t1)) s"
PYTHONUNBUFFERED=1 python jobs/train_pcl.py; rc=$?; t3=$(date +%s); echo "JOB rc=$rc $((t3-t2)) s"
echo "PRETRAIN+JOB $((t3-t1)) s"; echo "ALL $((t3-t0)) s"
