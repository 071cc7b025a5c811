#!/usr/bin/env bash
# GPU smoke test, one command:
#   bash scripts/gpu_smoke.sh /path/to/stylegan2-ada-pytorch [WORKDIR]
# Patches the checkout, trains --map=rtm for ~128 images of a generated dataset with the official
# custom CUDA ops (bias_act, upfirdn2d) and fp16, writes a snapshot, and runs generate.py on it.
set -euo pipefail
root=$(cd "${1:?usage: gpu_smoke.sh STYLEGAN2_ADA_ROOT [WORKDIR]}" && pwd)
work=${2:-$(mktemp -d)}
mkdir -p "$work" && work=$(cd "$work" && pwd)   # absolute: the script cds into the checkout below

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
rtm-mapping patch "$root"
rtm-mapping make-dataset --out "$work/data.zip" --count 256 --resolution 32

cd "$root"
python train.py --outdir="$work/runs" --data="$work/data.zip" --cfg=cifar --map=rtm --map-h=16 --smoke=128 --batch=64
pkl=$(ls "$work"/runs/*/network-snapshot-*.pkl | tail -n 1)
python - "$pkl" <<'PY'
import sys, torch, dnnlib, legacy
from torch_utils.ops import bias_act, upfirdn2d
assert bias_act._init() and upfirdn2d._init(), 'custom CUDA ops did not compile'
with dnnlib.util.open_url(sys.argv[1]) as f:
    G = legacy.load_network_pkl(f)['G_ema'].cuda()
print('mapper:', type(G.mapping).__name__, 'H =', G.mapping.rtm.steps, 'w_avg finite:', bool(torch.isfinite(G.mapping.w_avg).all()))
PY
python generate.py --network="$pkl" --seeds=0-7 --trunc=0.7 --outdir="$work/generated"
ls "$work/generated"
echo "GPU smoke test passed: $work"
