#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as one prepared run for a session lent one through the `device` tool
# (CI has no GPU; none of these has run yet). A failed step does not stop the next; each step's log and
# the accuracy summaries (one file) land in $OUT (7 files; 8 at most come back from there), run folders in /tmp.
#
#   here, once:  mkdir -p .gpu_data && cp ../shared/data/cifar10-dev.zip .gpu_data/   (.gpu_data/ is ignored)
#   device run:  command "bash bench/gpu_checks.sh", carry [".gpu_data"], timeout_s 540
#
# Order = value per device minute: the CUDA tests and `doctor` (fp16 + GradScaler, bf16, nccl, exact resume,
# no hidden syncs), the throughput bench, then the accuracy runs the default-epochs rule of issue 17 needs
# (`fast --epochs 3` and `--epochs 4`, seeds 0-2; a few minutes on an H200, ~2 h per 3-epoch seed on the CPU),
# then the 2-epoch moonshot's seeds 0-2 (one seed exists: 84.38%). EPOCHS="3 4 2" and SEEDS="0 1 2" override them.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_checks}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 EVA_API_CACHE=/tmp/eva_api_cache  # the decoded data cache (~150 MB) stays there
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's eva_api, uninstalled, in every subprocess too

step() {  # step NAME CMD...: the command's output to $out/NAME.log, its status and last lines here
    local name=$1
    shift
    local start=$SECONDS
    echo "== $name: $*"
    "$@" >"$out/$name.log" 2>&1
    echo "== $name: rc $? in $((SECONDS - start)) s"
    tail -n 6 "$out/$name.log"
}

"$py" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
step test_cuda "$py" -m pytest -q -rs tests/test_cuda.py
step doctor "$py" -m eva_api doctor --device cuda
step throughput "$py" bench/throughput.py --device cuda --quick

data=/tmp/cifar10-dev
if [ ! -d "$data" ] && [ -f .gpu_data/cifar10-dev.zip ]; then
    "$py" -m zipfile -e .gpu_data/cifar10-dev.zip /tmp
fi
if [ ! -d "$data" ]; then
    echo "== accuracy runs skipped: no $data (carry .gpu_data holding cifar10-dev.zip)"
    exit 0
fi
for epochs in ${EPOCHS:-3 4 2}; do
    # shellcheck disable=SC2086
    step "ep$epochs" "$py" bench/time_to_accuracy.py --data "$data" --recipe fast --epochs "$epochs" \
        --seeds ${SEEDS:-0 1 2} --no-progress --out "/tmp/gpu_runs/ep$epochs"
    { echo "== fast --epochs $epochs"; cat "/tmp/gpu_runs/ep$epochs/summary.json"; } >>"$out/summaries.txt" 2>/dev/null
done
