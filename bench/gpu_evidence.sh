#!/usr/bin/env bash
# One prepared GPU run (issues 18 and 19's CUDA path), for the `device` tool's machines or any CUDA box.
#
#   1. installs what the machine's image lacks from wheels in .gpu/whl (torch, torchvision, numpy, scikit-learn
#      and friends are taken from the image; nasloc runs from this checkout through PYTHONPATH);
#   2. starts the CIFAR-10 evidence (bench/evidence_full.py) at 30 epochs, with parallel units, stopping after
#      $MINUTES minutes; what finished is in $OUT/record.json. With $SEARCHES_FROM (a record.json, default
#      .gpu/cpu_record.json when there is one) it takes that study's searches and trains, at 0.03 GMACs, the seed
#      designs, the selection's finalists and picks and its first $RANK_TOP candidates (a whole protocol with its
#      own supernets and searches does not fit a window of minutes); without (SEARCHES_FROM=), the whole protocol
#      at $BUDGETS (default 0.03,0.1), e.g. SEARCHES_FROM= BUDGETS=0.1 for the 0.1 GMACs searches on the GPU;
#      $EVIDENCE_ARGS goes to evidence_full.py as it is, e.g. the replicate search of the tie rule's test:
#      SEARCHES_FROM= BUDGETS=0.03 EVIDENCE_ARGS="--search-seed 1 --samplers nsga2 --rank-top 4
#      --designs-from results/evidence_full/gpu_h200_30ep_record.json" (results/evidence_full/README.md);
#      each search runs $SEARCH_WORKERS processes (default 4): trials, then selection trainings, at a time on the card;
#   3. meanwhile checks the CUDA path: bench/gpu_checks.py (every mechanism: CUDA vs CPU, AMP gradients, dilated
#      attention's backward), the whole pipeline on CUDA (supernet with AMP, search, selection, retrain, export),
#      and `nasloc train` under torchrun with one process (DDP) and AMP.
#
# Prepare here:  .gpu/whl (see results/evidence_full/README.md), .gpu/train.tar.gz (the CIFAR-10 JPEGs) and
#                .gpu/cpu_record.json (a copy of results/evidence_full/record.json).
# Dry run on CPU: DEVICE=cpu SMALL=30 BATCH=64 EPOCHS=1 SUPERNET_EPOCHS=1 TRIALS=14 MINUTES=6 bash bench/gpu_evidence.sh
set -u
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-6.5}
EPOCHS=${EPOCHS:-30}
BATCH=${BATCH:-512}  # small nets on a big GPU are launch-bound: fewer, larger steps (the lr is scaled to it)
SEARCHES_FROM=${SEARCHES_FROM-$( [ -f .gpu/cpu_record.json ] && echo .gpu/cpu_record.json )}
RANK_TOP=${RANK_TOP:-3}
SMALL=${SMALL:-0}
SUPERNET_EPOCHS=${SUPERNET_EPOCHS:-5}
TRIALS=${TRIALS:-60}
JOBS=${JOBS:-10}
SEARCH_WORKERS=${SEARCH_WORKERS:-4}  # processes per search: trials and selection trainings at a time on the card
SCRATCH=${SCRATCH:-/tmp/nasloc-gpu}
PY=${PY:-python3}
mkdir -p "$OUT" "$SCRATCH"
started=$(date +%s)

if [ -d .gpu/whl ] && ! $PY -c "import optuna, fvcore" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/site" .gpu/whl/*.whl \
    > "$OUT/pip.txt" 2>&1 || { echo "pip install failed:"; tail -5 "$OUT/pip.txt"; }
  export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# nasloc's fused kernels are CPU-only; compiling them here (about 80 s, if a compiler is there at all) would
# spend device time on the CPU references of the checks, which are better eager anyway
export NASLOC_NATIVE=${NASLOC_NATIVE:-0}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  nproc
  $PY -c "import torch, timm, optuna; print('torch', torch.__version__, 'timm', timm.__version__, 'optuna', optuna.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
$PY -c "import nasloc.pipeline, nasloc.cli" || { echo "nasloc does not import here"; exit 1; }

# 2. the evidence, in the background so that it has the whole window; a record brought back from an earlier call
#    (.gpu/record.json) makes it go on where that one stopped (finished units are not run again)
mkdir -p "$SCRATCH/evidence"
[ -f .gpu/record.json ] && [ ! -f "$SCRATCH/evidence/record.json" ] && cp .gpu/record.json "$SCRATCH/evidence/"
if [ -n "$SEARCHES_FROM" ]; then
  scope=(--searches-from "$SEARCHES_FROM" --budgets "${BUDGETS:-0.03}" --rank-top "$RANK_TOP" --only seed,final,pick,rank)
else
  scope=(--budgets "${BUDGETS:-0.03,0.1}")
fi
$PY bench/evidence_full.py --device "$DEVICE" "${scope[@]}" --epochs "$EPOCHS" --batch-size "$BATCH" --search-batch-size "$BATCH" \
  --supernet-epochs "$SUPERNET_EPOCHS" --trials "$TRIALS" --search-workers "$SEARCH_WORKERS" --jobs "$JOBS" --threads 1 --loader-workers 0 \
  --minutes "$MINUTES" --small "$SMALL" --out "$SCRATCH/evidence" --work "$SCRATCH/work" --exports "$SCRATCH/exports" \
  --data-root "$SCRATCH/cifar-split" --cifar-tar "${CIFAR_TAR:-.gpu/train.tar.gz}" ${EVIDENCE_ARGS:-} > "$OUT/evidence.log" 2>&1 &
evidence=$!
( while kill -0 $evidence 2>/dev/null; do cp "$SCRATCH/evidence/record.json" "$OUT/" 2>/dev/null; sleep 15; done ) &

# 3. the CUDA path, while the evidence runs (CHECKS=0: not again, e.g. on a call that only finishes the evidence)
[ "${CHECKS:-1}" = 1 ] && {
  echo "== gpu_checks"
  $PY bench/gpu_checks.py --supernet
  echo "== pipeline on $DEVICE (tiny space, digits): supernet with AMP, search and selection in 2 processes, retrain, export"
  $PY run_search.py --budget 1.5M --space tiny --device "$DEVICE" --workers 2 --supernet-epochs 1 --trials 8 --select-top-k 2 \
    --select-epochs 2 --retrain-top-k 1 --retrain-epochs 1 --results-dir "$SCRATCH/runs" 2>&1 | grep "^\[nasloc\]\|rror"
  echo "pipeline exit ${PIPESTATUS[0]}"
  echo "== nasloc train under torchrun, one process (DDP), AMP"
  $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m nasloc train --model nasloc_deit_tiny \
    --dataset digits --epochs 1 --img-size 32 --device "$DEVICE" --out "$SCRATCH/ddp" 2>&1 | grep "^\[nasloc\]\|rror"
  echo "torchrun exit ${PIPESTATUS[0]}"
} > "$OUT/checks.txt" 2>&1
cat "$OUT/checks.txt"

wait $evidence
echo "evidence exit $?"
cp "$SCRATCH/evidence/record.json" "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$SCRATCH/evidence" logs 2>/dev/null
tail -n 40 "$OUT/evidence.log"
echo "wall $(( $(date +%s) - started )) s"
