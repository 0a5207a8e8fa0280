#!/bin/bash
# session 45: the job on conf/smollm2_bible_en_es.yaml, short (20 Phase-1 steps, 10 Phase-2 steps, a validation at
# the end), from the untuned GGUF-wheel teacher and its 6-layer cut (pretrain steps 0), to time its status lines
set -u
cd /tmp/fresh45b
echo "commit $(git rev-parse --short HEAD)"
echo "start $(date -u +%FT%TZ) $(date +%s)"
PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/fresh45b .venv/bin/python jobs/train_pcl.py --config conf/smollm2_bible_en_es.yaml --overwrite \
  models_dir=/tmp/vt/models pretrain.teacher_steps=0 pretrain.student_steps=0 run_dir=/tmp/s45/smol-job \
  train.phase1_steps=20 train.phase2_steps=10 train.validate_every=10
echo "end $(date -u +%FT%TZ) $(date +%s) rc=$?"
