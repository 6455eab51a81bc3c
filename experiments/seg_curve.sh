#!/bin/bash
# The segmentation gain against pretraining steps and pool size (experiments/rule_seg_curve.md).
#
#   OMP_NUM_THREADS=2 bash experiments/seg_curve.sh WORK POOL_STORE DEMO_STORE
#   python experiments/seg_curve.py --work WORK --out experiments/results_seg_curve.json
#
# POOL_STORE: the shipped models' pool (neurofm synth POOL --subjects 300 --sessions 2 --seed 1000 --resolution 2
# --first-subject 1001 --sites 3 --missing-rate 0.05; neurofm prepare POOL POOL_STORE --spacing 4). DEMO_STORE: the
# demo's store. Pretrains the demo's recipe (preset fomo25-cmeans-tiny, the shipped model's 10,000-step cosine, a
# checkpoint every 2,000 steps) as run A on the whole pool, stopped after step 6,000 (a stopped run writes a last
# checkpoint, here step 6,013), and as run B on its first 75 subjects, stopped after step 4,000, so that every
# checkpoint had the learning rate of the shipped schedule at its step; then resumes A to its 10,000 steps. Each
# checkpoint is fine-tuned as the demo fine-tunes its model (seg, 4 labelled subjects, seeds 0-9), paired with scratch
# on the same draws. One job at a time: two on two cores ran at half the total speed.
# Run it under the thread count the results should carry, from a tree whose src/ does not change meanwhile (changed
# source makes every finished fine-tuning run stale).
#
# Scratch takes its architecture from the pretrained model (`arch`, a setting its run records), so every checkpoint
# is reached through one link, WORK/ck: the first point's scratch runs are then every point's and are copied, not
# trained again; each point's pretrained runs are trained in its own folder.
set -u
W=$1 POOL=$2 DEMO=$3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
mkdir -p "$W"
done_ck() { [ -f "$1/meta.json" ] && [ -f "$1/model.safetensors" ]; }
pretrain_until() { # name, last step, extra arguments
  local ck
  ck=$W/$1/checkpoints/$(printf 'step-%07d' "$2")
  done_ck "$ck" && return
  $PY -m neurofm.cli pretrain --preset fomo25-cmeans-tiny --data "$POOL" --out "$W/$1" \
    --set trainer.max_steps=10000 --set trainer.checkpoint_every=2000 --set trainer.keep_checkpoints=6 "${@:3}" \
    > "$W/$1.log" 2>&1 &
  local pid=$!
  until done_ck "$ck"; do sleep 10; done
  kill $pid; wait $pid
}
first=""
evaluate() { # run, step
  local out
  ln -sfn "$W/$1/checkpoints/$(printf 'step-%07d' "$2")" "$W/ck"
  out=$W/eval-$1-$(printf 'step-%07d' "$2")
  mkdir -p "$out"
  [ -n "$first" ] && cp -r "$first"/seg-lesion-scratch-seed* "$out"/
  $PY "$ROOT/experiments/demo_seeds.py" --pretrained "$W/ck" --data "$DEMO" --out "$out" --tasks seg --seeds 10 \
    --no-floors > "$out.log" 2>&1
  [ -z "$first" ] && first=$out
}
pretrain_until A 6000
for step in 2000 4000 6000; do evaluate A $step; done
for i in $(seq 1076 1300); do echo "    - sub-$i"; done | sed '1i data:\n  exclude_subjects:' > "$W/pool75.yaml"
pretrain_until B 4000 --config "$W/pool75.yaml"
evaluate B 4000
done_ck "$W/A/checkpoints/step-0010000" || $PY -m neurofm.cli pretrain --out "$W/A" --resume > "$W/A-resume.log" 2>&1
evaluate A 10000
