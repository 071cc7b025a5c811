#!/usr/bin/env bash
# The README's main job: patch a StyleGAN2-ADA checkout, generate a small dataset, train --map=rtm
# for a few images (on the CPU when there is no GPU), and render images from the snapshot.
#   bash scripts/demo.sh /path/to/stylegan2-ada-pytorch [WORKDIR]
set -euo pipefail
root=$(cd "${1:?usage: demo.sh STYLEGAN2_ADA_ROOT [WORKDIR]}" && pwd)
work=${2:-$(mktemp -d)}
mkdir -p "$work" && work=$(cd "$work" && pwd)

rtm-mapping patch "$root"
[ -e "$work/data.zip" ] || rtm-mapping make-dataset --out "$work/data.zip" --count 64 --resolution 32

cd "$root"
python train.py --outdir="$work/runs" --data="$work/data.zip" --cfg=cifar --map=rtm --map-h=16 --smoke=32 --batch=16 --workers=1
pkl=$(ls -t "$work"/runs/*/network-snapshot-*.pkl | head -n 1)
if python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    python generate.py --network="$pkl" --seeds=0-3 --trunc=0.7 --outdir="$work/generated"
else
    rtm-mapping cpu generate.py --network="$pkl" --seeds=0-3 --trunc=0.7 --outdir="$work/generated"
fi
echo "Done: snapshot $pkl, images in $work/generated"
