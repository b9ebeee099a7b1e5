#!/usr/bin/env bash
# The GPU check: run on a machine with CUDA, from the project root, in under 10 minutes.
# Trains at 32, bf16-mixed and 16-mixed, runs DDP on every visible GPU, `main` end to end,
# times a 60,000-image synthetic epoch and runs the `gpu` tests. Figures go to stdout and to
# $OUT/gpu-check.txt (OUT defaults to a temp dir). Uses a throw-away sqlite tracking store.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$(mktemp -d -t lightcycle-gpu-check-XXXXXX)}"
WORK="$(mktemp -d -t lightcycle-gpu-work-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"
REPORT="$OUT/gpu-check.txt"
: >"$REPORT"

say() { echo "$*" | tee -a "$REPORT"; }
timed() {  # timed LABEL COMMAND...: run, log its last lines, record its wall time
    local label=$1 start end
    shift
    start=$(date +%s.%N)
    "$@" >"$WORK/$label.log" 2>&1 || { tail -40 "$WORK/$label.log"; say "FAILED: $label"; exit 1; }
    end=$(date +%s.%N)
    say "$(printf '%-28s %7.1f s  %s' "$label" "$(python -c "print($end - $start)")" \
        "$(grep -E 'test_accuracy=|seconds=' "$WORK/$label.log" | tail -1)")"
}

python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
    echo "error: no CUDA GPU here (torch.cuda.is_available() is False)" >&2; exit 2; }
GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
say "lightcycle gpu-check $(date -u +%FT%TZ) on $(python -c 'import torch; print(torch.cuda.get_device_name(0))') x$GPUS, torch $(python -c 'import torch; print(torch.__version__)')"

RUN=(mlflow run . --env-manager local -e train -P epochs=2 -P accelerator=gpu)
for precision in 32 bf16-mixed 16-mixed; do
    timed "train-$precision" "${RUN[@]}" -P precision="$precision"
done
timed "train-ddp-$GPUS-gpus" "${RUN[@]}" -P devices="$GPUS" -P strategy=ddp
timed "main" mlflow run . --env-manager local -P epochs=1 -P accelerator=gpu -P min_accuracy=0.1

# One epoch on 60,000 synthetic training images (the real data set's size), fit time only.
python - "$WORK/full" <<'PY'
import sys
sys.path.insert(0, "tests")
from pathlib import Path
from synthetic import FULL_SIZE, synthetic_data_dir
synthetic_data_dir(Path(sys.argv[1]), **FULL_SIZE)
PY
timed "epoch-60000-images" python steps/train.py --epochs 1 --accelerator gpu \
    --data_dir "$WORK/full" --batch_size 256
say "  fit_seconds (60,000 images, batch 256): $(python - <<'PY'
import mlflow
[run] = mlflow.search_runs(search_all_experiments=True, max_results=1,
                           order_by=["attributes.start_time DESC"], output_format="list")
print(f"{run.data.metrics['fit_seconds']:.1f}")
PY
)"

timed "gpu-tests" python -m pytest -p no:cacheprovider -n 0 -m gpu -q
say "gpu tests: $(tail -1 "$WORK/gpu-tests.log")"
say "report: $REPORT"
