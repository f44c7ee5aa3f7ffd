#!/usr/bin/env bash
# Every check and timing that needs a CUDA GPU, in one run of at most 8 minutes (CI has no GPU).
#
#   bash bench/gpu_checks.sh DATA [OUT]
#
# DATA: CIFAR-10 as `--data` takes it (a folder: official files or ImageFolder train/ + test/), or a .zip of
# such a folder (unpacked to /tmp). OUT (default ./gpu_checks, or $OUT): a few files, each step's log and
# the runs' summaries; run folders go to /tmp/gpu_runs, the decoded data cache to /tmp/eva_api_cache.
# Wheels of missing packages (torchsummary) in .whl/ are installed to /tmp/site first.
#
# Order = value per GPU minute; each step has a time cap and the whole script a deadline (DEADLINE seconds,
# default 480), so a slow step shortens the ones after it instead of the run overrunning:
#   1. tests/test_cuda.py (fp16 + GradScaler, bf16, captured steps against eager, exact resume eager and
#      captured, no hidden syncs, doctor, nccl) while the data is decoded;
#   2. `fast` 3 epochs (the captured step, the CUDA default), seeds 0-2 (time and accuracy; `nvidia-smi dmon`
#      beside them);
#   3. bench/throughput.py: eager, captured and compiled steps at batch 64 and 512, and bench/muon_cost.py;
#   4. `s8 --loader tensor` and `s8` (classic DataLoader, 12 workers: the notebook's path), 22 epochs each, seed 0:
#      the same accuracy is the check; classic is last and cut first (it ran ~8.5 s per epoch on an H200).
set -uo pipefail
cd "$(dirname "$0")/.."
data_arg=${1:-}
out=${2:-${OUT:-gpu_checks}}
mkdir -p "$out"
py="${PYTHON:-python3}"
deadline=${DEADLINE:-480}
export PYTHONUNBUFFERED=1 EVA_API_CACHE=/tmp/eva_api_cache
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's eva_api, uninstalled, in every subprocess too

step() {  # step NAME CAP_SECONDS CMD...: CMD's output appended to $out/NAME.log, at most CAP s and the time left
    local name=$1 cap=$2 left=$((deadline - SECONDS))
    shift 2
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 20 ]; then
        echo "== $name: skipped, ${left}s left" | tee -a "$out/$name.log"
        return
    fi
    local start=$SECONDS
    echo "== $name (cap ${cap}s): $*" | tee -a "$out/$name.log"
    timeout "$cap" "$@" >>"$out/$name.log" 2>&1
    echo "== $name: rc $? in $((SECONDS - start)) s" | tee -a "$out/$name.log"
    tail -n 4 "$out/$name.log"
}

{ nvidia-smi; "$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, '|', torch.cuda.get_device_name())"; } >"$out/env.txt" 2>&1
tail -n 1 "$out/env.txt"

data=""
case "$data_arg" in
    *.zip) "$py" -m zipfile -e "$data_arg" /tmp/gpu_data && data=$(dirname "$(find /tmp/gpu_data -maxdepth 3 -type d -name train | head -n 1)") ;;
    "") ;;
    *) data=$data_arg ;;
esac
if [ -n "$data" ]; then  # decode once into the cache while the tests run
    "$py" -c "import eva_api, sys; d = eva_api.load_data('cifar10', sys.argv[1], download=False, progress=False); print(d.source, len(d.train), len(d.test))" "$data" >"$out/fast.log" 2>&1 &
fi
step test_cuda 200 "$py" -m pytest -q -rs tests/test_cuda.py
wait
if [ -z "$data" ]; then
    echo "== no DATA: the training runs are skipped"
    step throughput 150 "$py" bench/throughput.py --device cuda
    exit 0
fi

tta() {  # tta NAME SEEDS RECIPE [--key value ...]: the command line of bench/time_to_accuracy.py into /tmp/gpu_runs/NAME
    local name=$1 seeds=$2
    shift 2
    # shellcheck disable=SC2086
    echo "$py" bench/time_to_accuracy.py --data "$data" --seeds $seeds --no-progress --out "/tmp/gpu_runs/$name" --recipe "$@"
}
summary() {  # summary NAME...: the runs' summary.json into $out/summaries.txt
    for name in "$@"; do
        { echo "== $name"; cat "/tmp/gpu_runs/$name/summary.json"; } >>"$out/summaries.txt" 2>/dev/null
    done
}
nvidia-smi dmon -s u -d 1 >"$out/dmon.log" 2>&1 &
dmon=$!
# shellcheck disable=SC2046
step fast 120 $(tta fast_graph "0 1 2" fast)
kill "$dmon" 2>/dev/null
summary fast_graph
step throughput 150 "$py" bench/throughput.py --device cuda
step throughput 30 "$py" bench/muon_cost.py --device cuda --rounds 3 --repeat 5
# shellcheck disable=SC2046
step s8 90 $(tta s8_tensor 0 s8 --loader tensor)
# shellcheck disable=SC2046
step s8 200 $(tta s8_classic 0 s8 --num-workers 12)
summary s8_tensor s8_classic
echo "== done in ${SECONDS}s"
