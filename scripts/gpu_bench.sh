#!/usr/bin/env bash
# GPU benchmark of rtm-mapping, one command, at most 10 minutes on one H100 or H200, start-up included:
#   bash scripts/gpu_bench.sh /path/to/stylegan2-ada-pytorch-or-stylegan3 [WORKDIR]
# It runs this checkout's code (rtm-mapping need not be installed; an installed one is not used) with the
# python on PATH ($PYTHON to choose another), and needs nothing but what a GPU node with a CUDA build of torch
# has: no network, no pip; besides torch, click numpy scipy pillow requests ninja psutil (and nvcc for NVIDIA's
# custom ops, which StyleGAN2-ADA replaces by its slow reference ops where they do not build).
# Stages, each timed, all on a copy of the checkout (yours is left untouched):
#   smoke   scripts/gpu_smoke.sh: --map=rtm with the official custom CUDA ops and fp16, snapshot, the official
#           image script (both StyleGAN3 families on a StyleGAN3 checkout)
#   bench   rtm-mapping bench --device cuda: dispatch (ops per call, CUDA launches, batch-1 latency: MLP 2 and 8
#           layers, RTM eager, RTM captured) and, on StyleGAN2-ADA, generator forward + training step at cifar
#           (batch 64) and paper512, MLP against RTM eager and RTM captured (torch.compile, CUDA graphs)
#   bench-imle  rtm-mapping bench --device cuda --part imle: RS-IMLE time per image (App. H) for each decoder, RTM
#           against the 8-layer MLP, and the nearest-neighbour search's throughput against one matrix product
#   train   train.py on a generated 32 px dataset, --map=mlp, --map=rtm, --map=rtm --map-compile: seconds per
#           kimg over the ticks after tick 0; StyleGAN2-ADA --cfg=cifar --batch=64, StyleGAN3 --cfg=stylegan3-t --batch=32.
#           The --map-compile run is the loss as the loop runs it under CUDA graphs: the mapper called twice
#           before a backward (style mixing) and in the discriminator phases.
# Time: each stage has a time limit (below) and the whole run a budget, GPU_BENCH_SECONDS (default 560 s from
# the start of this script; the report takes a few seconds more); a stage stopped at its limit, or not started
# because the budget is spent, is reported as such, and the others still run.
# Writes WORKDIR/gpu-bench.json and WORKDIR/gpu-bench.md. Without CUDA it stops at once. A stage that fails
# is reported as such (its log is WORKDIR/STAGE.log) and the others still run. A bench stage writes
# WORKDIR/bench-NAME.json, which the report picks up by its name (rtm_mapping/bench/gpu_report.py).
# MAP_COMPILE=MODE picks the torch.compile mode of the captured RTM (default auto: CUDA graphs on CUDA;
# MAP_COMPILE=default captures without CUDA graphs). TRAIN_KIMG=8: the train.py runs' length.
set -euo pipefail
usage='usage: gpu_bench.sh STYLEGAN2_ADA_OR_STYLEGAN3_ROOT [WORKDIR]'
src=$(cd "${1:?$usage}" && pwd)
work=${2:-$(mktemp -d)}
mkdir -p "$work" && work=$(cd "$work" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"     # this checkout's rtm_mapping and stylegan2_ada_patch, in every process
PYTHON=${PYTHON:-python}
TRAIN_KIMG=${TRAIN_KIMG:-8}     # ticks of 4 kimg after tick 0: 2 by default
MAP_COMPILE=${MAP_COMPILE:-auto}
BUDGET=${GPU_BENCH_SECONDS:-560}
rtm_mapping=("$PYTHON" -m rtm_mapping.cli)             # the rtm-mapping command of this checkout

"$PYTHON" -c "import torch, sys; torch.cuda.is_available() or sys.exit('gpu_bench.sh: torch sees no CUDA device (torch ' + torch.__version__ + '); run it on a machine with an NVIDIA GPU and a CUDA build of torch. On the CPU, use: rtm-mapping bench --part dispatch')"
"$PYTHON" - <<'PY'
import importlib.util, sys, torch, rtm_mapping
missing = [name for name in ('click', 'numpy', 'scipy', 'PIL', 'requests', 'psutil') if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f'gpu_bench.sh: this python lacks {", ".join(missing)} (NVIDIA\'s train.py and rtm-mapping need them)')
print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| rtm-mapping', rtm_mapping.__version__, 'from', rtm_mapping.__file__)
PY

# Which official codebase. One entry per codebase: the checkout test, then the stages' settings.
# bench's generator part and its official-MLP baseline build StyleGAN2-ADA's networks: on a StyleGAN3
# checkout the dispatch part measures against ReferenceMLP (the same layers) and the generator part is skipped.
arm_flags_mlp=(--map=mlp); arm_flags_rtm=(--map=rtm); arm_flags_rtm_compile=(--map=rtm --map-compile="$MAP_COMPILE")
if [ -f "$src/training/networks_stylegan3.py" ] && [ -f "$src/train.py" ]; then
    codebase=stylegan3
    train_common=(--cfg=stylegan3-t --gpus=1 --batch=32 --gamma=0.5 --kimg="$TRAIN_KIMG" --snap=1000 --metrics=none --workers=2)
    bench_checkout=(); bench_generator=0
    smoke_limit=240; train_limit=90     # seconds; the smoke builds filtered_lrelu too
elif [ -f "$src/training/networks.py" ] && [ -f "$src/train.py" ]; then
    codebase=stylegan2-ada
    train_common=(--cfg=cifar --batch=64 --kimg="$TRAIN_KIMG" --snap=1000 --metrics=none --workers=2)
    bench_checkout=(--stylegan "$src"); bench_generator=1
    smoke_limit=150; train_limit=75
else
    echo "gpu_bench.sh: $src is neither a StyleGAN2-ADA nor a StyleGAN3 checkout (no train.py, training/networks*.py)." >&2
    exit 2
fi

root="$work/$codebase"          # a private copy: patching and compiled ops stay out of the user's checkout
rm -rf "$root" && cp -r "$src" "$root"
export TORCHINDUCTOR_CACHE_DIR="$work/inductor-cache"   # graphs the bench compiled, train.py reuses
stages=()         # NAME=SECONDS, in order
failed=()

stage() {   # stage NAME LIMIT COMMAND...: run (a program, not a function) for at most LIMIT seconds (less if the budget is nearly spent), log to
            # WORKDIR/NAME.log, time it; a failure, a stop at the limit or a stage not started is recorded, not fatal
    local name=$1 limit=$2; shift 2
    local start=$SECONDS left=$((BUDGET - SECONDS)) status=0
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 30 ]; then
        failed+=("$name"); stages+=("$name=0")
        echo "== $name: not run, the ${BUDGET} s budget is spent" | tee "$work/$name.log" >&2
        return
    fi
    echo "== $name (at most $limit s): $*"
    timeout -k 15 "$limit" "$@" > "$work/$name.log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        failed+=("$name")
        if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
            echo "gpu_bench.sh: stage $name stopped at its limit of $limit s, see $work/$name.log:" >&2
        else
            echo "gpu_bench.sh: stage $name failed, see $work/$name.log:" >&2
        fi
        tail -n 20 "$work/$name.log" >&2
    fi
    stages+=("$name=$((SECONDS - start))")
    echo "   $((SECONDS - start)) s"
}

stage smoke "$smoke_limit" bash "$here/gpu_smoke.sh" "$root" "$work/smoke"
[ ${#bench_checkout[@]} -eq 0 ] || bench_checkout=(--stylegan "$root")
bench=("${rtm_mapping[@]}" bench --device cuda "${bench_checkout[@]}" --compile-mode "$MAP_COMPILE" --repeats 100 --warmup 10 --gen-repeats 10 --gen-warmup 3)
stage bench-dispatch 80 "${bench[@]}" --part dispatch --out "$work/bench-dispatch.json"
[ "$bench_generator" = 0 ] || stage bench-generator 110 "${bench[@]}" --part generator --config cifar --config paper512 --out "$work/bench-generator.json"
# RS-IMLE (pure PyTorch, no checkout): App. H's time per image of each decoder, RTM config against MLP config, and the
# sampler's exact search at CIFAR-10 scale (n = 50,000 against m = 500,736 of 800) against one plain product of that
# shape, with its peak memory. App. H takes the median of 200 passes after 20; IMLE_REPEATS / IMLE_WARMUP (default 20
# after 5) keep the stage near 1.5 minutes (an estimate: no GPU was available where this was written).
stage bench-imle 100 "${rtm_mapping[@]}" bench --device cuda --part imle --imle-repeats "${IMLE_REPEATS:-20}" --imle-warmup "${IMLE_WARMUP:-5}" --out "$work/bench-imle.json"

"${rtm_mapping[@]}" make-dataset --out "$work/data.zip" --count 1024 --resolution 32 > /dev/null
train=(bash -c 'cd "$0" && exec "$@"' "$root" "$PYTHON" train.py --data="$work/data.zip" "${train_common[@]}")   # in the copy
stage train-mlp "$train_limit" "${train[@]}" --outdir="$work/train-mlp" "${arm_flags_mlp[@]}"
stage train-rtm "$train_limit" "${train[@]}" --outdir="$work/train-rtm" "${arm_flags_rtm[@]}"
stage train-rtm-compile "$((train_limit + 60))" "${train[@]}" --outdir="$work/train-rtm-compile" "${arm_flags_rtm_compile[@]}"   # + compiling

"$PYTHON" -m rtm_mapping.bench.gpu_report "$work" "${failed[*]:-}" "${stages[@]}"   # WORKDIR/bench-*.json, train-*/: one report
echo "Wrote $work/gpu-bench.json and $work/gpu-bench.md"
[ ${#failed[@]} -eq 0 ] || { echo "gpu_bench.sh: failed stages: ${failed[*]}" >&2; exit 1; }
