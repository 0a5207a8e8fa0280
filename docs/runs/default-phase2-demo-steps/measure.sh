set -e
cd /work/main; . .venv/bin/activate; export RAY_AUTH_MODE=token
python /tmp/demo_bench.py 2>&1 | grep -v Warning
t0=$(date +%s); python jobs/train_bc.py run_dir=/tmp/p1 > /tmp/p1.log 2>&1; echo "PHASE1 $(( $(date +%s) - t0 )) s"
for i in 1 2; do for K in 1 4; do
  t0=$(date +%s)
  python jobs/train_pcl.py --phase1 /tmp/p1/phase1 --overwrite run_dir=/tmp/p2-k$K-$i train.phase2_steps=300 \
    train.validate_every=1000 train.export_thresholds=false train.phase2_demo_steps=$K > /tmp/p2-k$K-$i.log 2>&1
  python -c "
import json; r=json.load(open('/tmp/p2-k$K-$i/report.json'))['ray']
print('K=$K run $i: job $(( $(date +%s) - t0 )) s, phase 2 %.0f s, %.1f trajectories/s, worker rollout %.0f s, learner %.0f s' % (r['seconds'], r['trajectories']/r['seconds'], r['worker_rollout_s'], r['learner_s']))"
done; done
