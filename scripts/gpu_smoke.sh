#!/usr/bin/env bash
# GPU smoke test, one command, for a StyleGAN2-ADA or a StyleGAN3 checkout, a few minutes on one GPU:
#   bash scripts/gpu_smoke.sh /path/to/stylegan2-ada-pytorch-or-stylegan3 [WORKDIR]
# Patches the checkout, trains --map=rtm for ~128 images of a generated dataset with the official
# custom CUDA ops and fp16, writes a snapshot, and renders images from it with the official script.
# StyleGAN2-ADA: --cfg=cifar and generate.py. StyleGAN3: --cfg=stylegan3-t and --cfg=stylegan2, gen_images.py.
# Runs this checkout's code with the python on PATH ($PYTHON to choose another), offline, with nothing but
# what a GPU node with a CUDA build of torch has (see gpu_bench.sh).
set -euo pipefail
root=$(cd "${1:?usage: gpu_smoke.sh STYLEGAN_ROOT [WORKDIR]}" && pwd)
work=${2:-$(mktemp -d)}
mkdir -p "$work" && work=$(cd "$work" && pwd)   # absolute: the script cds into the checkout below
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"     # this checkout's rtm_mapping and stylegan2_ada_patch, in every process
PYTHON=${PYTHON:-python}
rtm_mapping=("$PYTHON" -m rtm_mapping.cli)

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
"${rtm_mapping[@]}" patch "$root"
"${rtm_mapping[@]}" make-dataset --out "$work/data.zip" --count 256 --resolution 32
cd "$root"

check() {  # the snapshot has an RTM, a finite w_avg, and the custom CUDA ops compiled
"$PYTHON" - "$1" "$2" <<'PY'
import sys, torch, importlib
from stylegan2_ada_patch import compat
compat.fix_pkg_resources()      # NVIDIA's StyleGAN3 ops import pkg_resources; a stand-in where setuptools has none
import dnnlib, legacy
ops = [importlib.import_module(f'torch_utils.ops.{name}') for name in sys.argv[2].split(',')]
with dnnlib.util.open_url(sys.argv[1]) as f:
    G = legacy.load_network_pkl(f)['G_ema'].cuda()
G(torch.randn([2, G.z_dim], device='cuda'), torch.zeros([2, G.c_dim], device='cuda'))
assert all(op._init() for op in ops), 'custom CUDA ops did not compile'
print('mapper:', type(G.mapping).__name__, 'H =', G.mapping.rtm.steps, 'w_avg finite:', bool(torch.isfinite(G.mapping.w_avg).all()))
PY
}

stock() {  # stock SCRIPT ARGS...: an official script as it is; where setuptools has no pkg_resources (which NVIDIA's
           # StyleGAN3 ops import), with the stand-in of stylegan2_ada_patch/compat.py, as the patched train.py has it
    if "$PYTHON" -c "import pkg_resources" 2>/dev/null; then
        "$PYTHON" "$@"
    else
        "$PYTHON" -c "import runpy, sys; from stylegan2_ada_patch import compat; compat.fix_pkg_resources(); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" "$@"
    fi
}

if [ -f training/networks_stylegan3.py ]; then
    for cfg in stylegan3-t stylegan2; do
        "$PYTHON" train.py --outdir="$work/runs-$cfg" --data="$work/data.zip" --cfg=$cfg --gpus=1 --batch=32 --gamma=0.5 --map=rtm --map-h=16 --smoke=128
        pkl=$(ls "$work/runs-$cfg"/*/network-snapshot-*.pkl | tail -n 1)
        check "$pkl" bias_act,upfirdn2d$([ $cfg = stylegan2 ] || echo ,filtered_lrelu)
        stock gen_images.py --network="$pkl" --seeds=0-7 --trunc=0.7 --outdir="$work/generated-$cfg"
        ls "$work/generated-$cfg"
    done
else
    "$PYTHON" train.py --outdir="$work/runs" --data="$work/data.zip" --cfg=cifar --map=rtm --map-h=16 --smoke=128 --batch=64
    pkl=$(ls "$work"/runs/*/network-snapshot-*.pkl | tail -n 1)
    check "$pkl" bias_act,upfirdn2d
    stock generate.py --network="$pkl" --seeds=0-7 --trunc=0.7 --outdir="$work/generated"
    ls "$work/generated"
fi
echo "GPU smoke test passed: $work"
