#!/usr/bin/env bash
# GPU smoke test, one command, for a StyleGAN2-ADA or a StyleGAN3 checkout:
#   bash scripts/gpu_smoke.sh /path/to/stylegan2-ada-pytorch-or-stylegan3 [WORKDIR]
# Patches the checkout, trains --map=rtm for ~128 images of a generated dataset with the official
# custom CUDA ops and fp16, writes a snapshot, and renders images from it with the official script.
# StyleGAN2-ADA: --cfg=cifar and generate.py. StyleGAN3: --cfg=stylegan3-t and --cfg=stylegan2, gen_images.py.
set -euo pipefail
root=$(cd "${1:?usage: gpu_smoke.sh STYLEGAN_ROOT [WORKDIR]}" && pwd)
work=${2:-$(mktemp -d)}
mkdir -p "$work" && work=$(cd "$work" && pwd)   # absolute: the script cds into the checkout below

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
rtm-mapping patch "$root"
rtm-mapping make-dataset --out "$work/data.zip" --count 256 --resolution 32
cd "$root"

check() {  # the snapshot has an RTM, a finite w_avg, and the custom CUDA ops compiled
python - "$1" "$2" <<'PY'
import sys, torch, dnnlib, legacy, importlib
ops = [importlib.import_module(f'torch_utils.ops.{name}') for name in sys.argv[2].split(',')]
with dnnlib.util.open_url(sys.argv[1]) as f:
    G = legacy.load_network_pkl(f)['G_ema'].cuda()
G(torch.randn([2, G.z_dim], device='cuda'), torch.zeros([2, G.c_dim], device='cuda'))
assert all(op._init() for op in ops), 'custom CUDA ops did not compile'
print('mapper:', type(G.mapping).__name__, 'H =', G.mapping.rtm.steps, 'w_avg finite:', bool(torch.isfinite(G.mapping.w_avg).all()))
PY
}

if [ -f training/networks_stylegan3.py ]; then
    # NVIDIA's StyleGAN3 ops import pkg_resources, which setuptools >= 81 no longer has; the patched
    # train.py copes, the stock gen_images.py does not.
    python -c "import pkg_resources" 2>/dev/null || { echo "gen_images.py needs pkg_resources: pip install 'setuptools<81'"; exit 1; }
    for cfg in stylegan3-t stylegan2; do
        python train.py --outdir="$work/runs-$cfg" --data="$work/data.zip" --cfg=$cfg --gpus=1 --batch=32 --gamma=0.5 --map=rtm --map-h=16 --smoke=128
        pkl=$(ls "$work/runs-$cfg"/*/network-snapshot-*.pkl | tail -n 1)
        check "$pkl" bias_act,upfirdn2d$([ $cfg = stylegan2 ] || echo ,filtered_lrelu)
        python gen_images.py --network="$pkl" --seeds=0-7 --trunc=0.7 --outdir="$work/generated-$cfg"
        ls "$work/generated-$cfg"
    done
else
    python train.py --outdir="$work/runs" --data="$work/data.zip" --cfg=cifar --map=rtm --map-h=16 --smoke=128 --batch=64
    pkl=$(ls "$work"/runs/*/network-snapshot-*.pkl | tail -n 1)
    check "$pkl" bias_act,upfirdn2d
    python generate.py --network="$pkl" --seeds=0-7 --trunc=0.7 --outdir="$work/generated"
    ls "$work/generated"
fi
echo "GPU smoke test passed: $work"
