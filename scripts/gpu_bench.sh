#!/usr/bin/env bash
# GPU benchmark of rtm-mapping, one command (issue 14), about 8 minutes on one H100 or H200:
#   bash scripts/gpu_bench.sh /path/to/stylegan2-ada-pytorch [WORKDIR]
# Stages, each timed, all on a copy of the checkout (yours is left untouched):
#   smoke   scripts/gpu_smoke.sh: --map=rtm with the official custom CUDA ops and fp16, snapshot, generate.py
#   bench   rtm-mapping bench --device cuda: dispatch (ops per call, CUDA launches, batch-1 latency: MLP 2 and 8
#           layers, RTM eager, RTM captured) and generator forward + training step at cifar (batch 64) and
#           paper512, MLP against RTM eager and RTM captured (torch.compile, CUDA graphs)
#   train   train.py --cfg=cifar --batch=64 on a generated dataset, --map=mlp, --map=rtm, --map=rtm --map-compile:
#           seconds per kimg over the ticks after tick 0
# Writes WORKDIR/gpu-bench.json and WORKDIR/gpu-bench.md. Without CUDA it stops at once. A stage that fails
# is reported as such (its log is WORKDIR/STAGE.log) and the others still run.
# MAP_COMPILE=MODE picks the torch.compile mode of the captured RTM (default auto: CUDA graphs on CUDA;
# MAP_COMPILE=default captures without CUDA graphs). TRAIN_KIMG=8: the train.py runs' length.
set -euo pipefail
usage='usage: gpu_bench.sh STYLEGAN2_ADA_ROOT [WORKDIR]'
src=$(cd "${1:?$usage}" && pwd)
work=${2:-$(mktemp -d)}
mkdir -p "$work" && work=$(cd "$work" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
TRAIN_KIMG=${TRAIN_KIMG:-8}     # ticks of 4 kimg after tick 0: 2 by default
MAP_COMPILE=${MAP_COMPILE:-auto}

python -c "import torch, sys; torch.cuda.is_available() or sys.exit('gpu_bench.sh: torch sees no CUDA device (torch ' + torch.__version__ + '); run it on a machine with an NVIDIA GPU and a CUDA build of torch. On the CPU, use: rtm-mapping bench --part dispatch')"
python -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"

# Which official codebase. One entry per codebase: the checkout test, then the stages' settings.
if [ -f "$src/training/networks_stylegan2.py" ]; then
    echo "gpu_bench.sh: $src is a StyleGAN3 checkout; this script measures StyleGAN2-ADA checkouts only so far." >&2
    exit 2
elif [ -f "$src/training/networks.py" ] && [ -f "$src/train.py" ]; then
    codebase=stylegan2-ada
    train_common=(--cfg=cifar --batch=64 --kimg="$TRAIN_KIMG" --snap=1000 --metrics=none --workers=2)
    arm_flags_mlp=(--map=mlp); arm_flags_rtm=(--map=rtm); arm_flags_rtm_compile=(--map=rtm --map-compile="$MAP_COMPILE")
else
    echo "gpu_bench.sh: $src is not a StyleGAN2-ADA checkout (no train.py, training/networks.py)." >&2
    exit 2
fi

root="$work/$codebase"          # a private copy: patching and compiled ops stay out of the user's checkout
rm -rf "$root" && cp -r "$src" "$root"
export TORCHINDUCTOR_CACHE_DIR="$work/inductor-cache"   # graphs the bench compiled, train.py reuses
stages=()         # NAME=SECONDS, in order
failed=()

stage() {   # stage NAME COMMAND...: run, log to WORKDIR/NAME.log, time it; a failure is recorded, not fatal
    local name=$1; shift
    local start=$SECONDS
    echo "== $name: $*"
    if ! "$@" > "$work/$name.log" 2>&1; then
        failed+=("$name")
        echo "gpu_bench.sh: stage $name failed, see $work/$name.log:" >&2
        tail -n 20 "$work/$name.log" >&2
    fi
    stages+=("$name=$((SECONDS - start))")
    echo "   $((SECONDS - start)) s"
}

stage smoke bash "$here/gpu_smoke.sh" "$root" "$work/smoke"
bench=(rtm-mapping bench --device cuda --stylegan "$root" --compile-mode "$MAP_COMPILE" --repeats 100 --warmup 10 --gen-repeats 10 --gen-warmup 3)
stage bench-dispatch "${bench[@]}" --part dispatch --out "$work/bench-dispatch.json"
stage bench-generator "${bench[@]}" --part generator --config cifar --config paper512 --out "$work/bench-generator.json"

rtm-mapping make-dataset --out "$work/data.zip" --count 1024 --resolution 32 > /dev/null
train() {   # train ARM FLAGS...
    local arm=$1; shift
    (cd "$root" && python train.py --outdir="$work/train-$arm" --data="$work/data.zip" "${train_common[@]}" "$@")
}
stage train-mlp train mlp "${arm_flags_mlp[@]}"
stage train-rtm train rtm "${arm_flags_rtm[@]}"
stage train-rtm-compile train rtm-compile "${arm_flags_rtm_compile[@]}"

python - "$work" "${failed[*]:-}" "${stages[@]}" <<'PY'
import glob, os, sys
from rtm_mapping import bench
work, failed, stages = sys.argv[1], sys.argv[2].split(), dict(s.split('=') for s in sys.argv[3:])
jsons = [p for p in (os.path.join(work, f'bench-{part}.json') for part in ('dispatch', 'generator')) if os.path.isfile(p)]
runs = {}
for arm in bench.TRAIN_ARMS:
    found = sorted(glob.glob(os.path.join(work, f'train-{arm}', '*', 'stats.jsonl')))
    runs[arm] = os.path.dirname(found[-1]) if found and f'train-{arm}' not in failed else None
table = bench.write_gpu_report(jsons, runs, {name: float(sec) for name, sec in stages.items()}, failed,
                               os.path.join(work, 'gpu-bench.json'), os.path.join(work, 'gpu-bench.md'))
print(table)
PY
echo "Wrote $work/gpu-bench.json and $work/gpu-bench.md"
[ ${#failed[@]} -eq 0 ] || { echo "gpu_bench.sh: failed stages: ${failed[*]}" >&2; exit 1; }
