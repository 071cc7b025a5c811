#!/usr/bin/env bash
# The RS-IMLE stage of the GPU benchmark (rtm-mapping bench --part imle on CUDA), about 1.5 minutes on one
# H100 or H200, so that scripts/gpu_bench.sh stays under 10 minutes with it:
#   bash scripts/gpu_bench_imle.sh WORKDIR          writes WORKDIR/bench-imle.json and prints its tables
# What it measures (rtm_mapping/imle/bench.py): App. H's time per image of each decoder (CIFAR-10 batch 64,
# CelebA-HQ and few-shot batch 16, full width), RTM config against MLP config, EMA generator without gradient;
# and the sampler's exact nearest-neighbour search at CIFAR-10 scale (n = 50,000 against m = 500,736 features
# of 800) against one plain float32 product of that shape, with its peak memory. App. H's protocol takes the
# median of 200 passes after 20; this stage takes IMLE_REPEATS=20 after IMLE_WARMUP=5 (about 25 s of the
# three decoders' 50 passes each), enough for a median on an idle GPU; set them to 200 and 20 for the paper's.
# In gpu_bench.sh, after the bench stages, one line (its report, rtm_mapping.bench.gpu_report, reads every
# WORKDIR/bench-*.json, this stage's too):
#   stage bench-imle bash "$here/gpu_bench_imle.sh" "$work"
set -euo pipefail
work=${1:?usage: gpu_bench_imle.sh WORKDIR}
mkdir -p "$work"
python -c "import torch, sys; torch.cuda.is_available() or sys.exit('gpu_bench_imle.sh: torch sees no CUDA device; on the CPU use: rtm-mapping bench --quick --part imle')"
rtm-mapping bench --device cuda --part imle --imle-repeats "${IMLE_REPEATS:-20}" --imle-warmup "${IMLE_WARMUP:-5}" --out "$work/bench-imle.json"
