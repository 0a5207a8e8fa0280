#!/bin/bash
# session 45: the local loop on conf/smollm2_bible_en_es.yaml at a921972, short (20 Phase-1 steps, 10 Phase-2 steps), from
# the untuned GGUF-wheel teacher and its 6-layer cut (pretrain steps 0), to time its status lines; nothing else running
cd /tmp/fresh45b  # a clone at a921972, .venv and models linked from /work/main
.venv/bin/python -m kdtw.cli train --local --config conf/smollm2_bible_en_es.yaml models_dir=/tmp/vt/models \
  pretrain.teacher_steps=0 pretrain.student_steps=0 run_dir=/tmp/s45/smol-local train.phase1_steps=20 train.phase2_steps=10 \
  train.validate_every=10 2>&1 | while IFS= read -r l; do echo "$(date +%s) $l"; done > /tmp/s45/smol-local.times.log
