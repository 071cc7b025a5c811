#!/usr/bin/env bash
# The README's main job: patch a StyleGAN2-ADA checkout, generate a small dataset, train --map=rtm
# for a few images (on the CPU when there is no GPU), and render images from the snapshot.
#   bash scripts/demo.sh [STYLEGAN2_ADA_ROOT [WORKDIR]]
# Without a checkout (argument or $STYLEGAN2_ADA_ROOT), clones NVIDIA's at the tested commit into WORKDIR.
# $PYTHON is the interpreter that has rtm-mapping installed (default: python).
set -euo pipefail
python=${PYTHON:-python}
work=${2:-$(mktemp -d)}
mkdir -p "$work" && work=$(cd "$work" && pwd)
root=${1:-${STYLEGAN2_ADA_ROOT:-}}
if [ -z "$root" ]; then
    root=$("$python" -m rtm_mapping.cli get-stylegan "$work/stylegan2-ada-pytorch")
fi
root=$(cd "$root" && pwd)
rtm() { "$python" -m rtm_mapping.cli "$@"; }

rtm patch "$root"
[ -e "$work/data.zip" ] || rtm make-dataset --out "$work/data.zip" --count 64 --resolution 32

cd "$root"
"$python" train.py --outdir="$work/runs" --data="$work/data.zip" --cfg=cifar --map=rtm --map-h=16 --smoke=16 --batch=16 --workers=1
pkl=$(ls -t "$work"/runs/*/network-snapshot-*.pkl | head -n 1)
if "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    "$python" generate.py --network="$pkl" --seeds=0-3 --trunc=0.7 --outdir="$work/generated"
else
    rtm cpu generate.py --network="$pkl" --seeds=0-3 --trunc=0.7 --outdir="$work/generated"
fi
echo "Done: snapshot $pkl, images in $work/generated"
