"""`rtm-mapping mode-coverage`: does the recursive mapper cover more modes than the MLP? A toy GAN on a CPU.

The paper's Table 3 claims that RTM improves coverage and recall (AFHQ-512 recall 0.507 -> 0.565); that
needs GPUs for days. This is the experiment anyone can rerun in minutes: a generator made of a mapper
(the official 2- and 8-layer MLP structure, `mlp.ReferenceMLP`, and RTM at H = 1, 4, 16) followed by
the same small MLP decoder, trained as a GAN on distributions with known modes (the 2-D ring of 8 and
grid of 25 Gaussians of the mode-collapse literature, e.g. PacGAN, Lin et al. 2018, here with wider
modes; and 100 modes on corners of a 10-D hypercube embedded in 64-D). Every mapper gets the same
decoder and discriminator initialisation, the same real batches and latents, the same optimizer and the
same number of steps for a seed; only the mapper differs.

Measured per run: modes covered, share of high-quality samples, KL divergence of the mode histogram from
uniform (definitions in `mode_statistics`), and `metrics.prdc` against samples of the true distribution.
Summaries: medians over seeds with percentile-bootstrap intervals over seeds, and the median of the
paired differences against the 2-layer MLP (same seed, hence same data, latents and decoder start).
"""

import contextlib
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import resource
import shlex
import sys
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

import click
import numpy as np
import scipy.special
import torch
import torch.nn.functional as F

from rtm_mapping import __version__
from rtm_mapping.core import RecursiveTokenMapper
from rtm_mapping.metrics import prdc
from rtm_mapping.mlp import ReferenceMLP

#----------------------------------------------------------------------------
# What is run, in one place.

# Mappers: the official MLP depths (train.py --cfg=cifar uses 2 layers, the paper configs 8) and RTM at three H.
MAPPERS = {
    'MLP-2':    dict(kind='mlp', layers=2),
    'MLP-8':    dict(kind='mlp', layers=8),
    'RTM-H1':  dict(kind='rtm', steps=1),
    'RTM-H4':  dict(kind='rtm', steps=4),
    'RTM-H16': dict(kind='rtm', steps=16),
}
BASELINE = 'MLP-2'      # Table 3's baseline mapper; paired differences are taken against it.

# Training settings of a full run and of --quick (a smoke test of the pipeline, not a measurement).
RUNS = {
    'full': dict(
        seeds           = 5,        # Seeds 0 ... seeds-1, the same for every mapper.
        steps           = 600,      # Discriminator steps = generator steps.
        batch           = 256,      # Real and fake samples per step.
        z_dim           = 64,       # Latent width; w_dim is the same.
        tokens          = 4,        # RTM tokens; token_dim = z_dim / tokens keeps the lift and readout square, as core.DEFAULTS.
        hidden          = 128,      # Width of the decoder's and the discriminator's two hidden layers.
        lr_g            = 0.001,    # Adam learning rate of G (mapper and decoder).
        lr_d            = 0.004,    # Adam learning rate of D (two-timescale: 4x G's).
        betas           = (0.0, 0.99),  # Adam betas (StyleGAN2).
        mapper_lr_multiplier = 0.01,    # Equalized-lr multiplier of every mapper layer, MLP and RTM alike (StyleGAN2's 0.01).
        r1_gamma        = 0.0001,     # R1 weight, gamma / 2 * |grad D(real)|^2 on every discriminator step.
        samples_per_mode = 100,     # Evaluation samples: 100 per mode (2,500 for the grid).
        min_count       = 20,       # A mode is covered with at least this many high-quality samples (20% of a uniform share).
        prdc_samples    = 2500,     # Generated and true samples for PRDC.
        prdc_k          = 5,        # PRDC neighbourhood (Table 3: 5).
        plot_samples    = 1000,     # Samples drawn in each scatter panel.
    ),
}
RUNS['quick'] = dict(RUNS['full'], seeds=2, steps=12, batch=64, samples_per_mode=20, min_count=2, prdc_samples=200, plot_samples=200)

BOOTSTRAP_RESAMPLES = 10000
BOOTSTRAP_SEED = 0          # The bootstrap has its own fixed RNG: the same runs give the same intervals.
CONFIDENCE = 0.95

# "Within 3 standard deviations": in 2-D a true sample lies within 3 sigma of its mode with probability
# 1 - exp(-9/2) = 98.89%. In D dimensions the same probability gives the radius sigma * sqrt(chi2_D^-1(p)),
# which is exactly 3 sigma for D = 2 (a 3-sigma ball in 64-D would reject almost every true sample).
HIGH_QUALITY_PROB = 1.0 - math.exp(-4.5)

#----------------------------------------------------------------------------
# Distributions with known modes.

@dataclasses.dataclass(frozen=True)
class ModeDataset:
    """An equal-weight mixture of isotropic Gaussians: `means` [modes, dim], standard deviation `std`."""
    name:   str
    means:  torch.Tensor
    std:    float
    doc:    str

    @property
    def modes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def radius(self) -> float:
        """High-quality radius: sigma * sqrt(chi2_dim^-1(HIGH_QUALITY_PROB)); 3 sigma in 2-D."""
        return self.std * math.sqrt(2 * scipy.special.gammaincinv(self.dim / 2, HIGH_QUALITY_PROB))   # chi2.ppf(p, dim)

    def sample(self, num: int, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(self.modes, [num], generator=generator)
        return self.means[index] + self.std * torch.randn([num, self.dim], generator=generator)


CUBE_SEED = 0x43554245  # 'CUBE': which corners and which embedding, fixed once for everyone.


def _ring(modes: int = 8, radius: float = 1.0) -> torch.Tensor:
    angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    return (radius * torch.stack([angle.cos(), angle.sin()], dim=1)).to(torch.float32)


def _grid(side: int = 5, spacing: float = 1.0) -> torch.Tensor:
    axis = (torch.arange(side, dtype=torch.float32) - (side - 1) / 2) * spacing
    return torch.cartesian_prod(axis, axis)


def _cube(modes: int = 100, cube_dim: int = 10, dim: int = 64) -> torch.Tensor:
    rng = np.random.default_rng(CUBE_SEED)
    corners = rng.choice(2 ** cube_dim, size=modes, replace=False)
    bits = (corners[:, None] >> np.arange(cube_dim)) & 1
    embed, _ = np.linalg.qr(rng.standard_normal([dim, cube_dim]))  # Orthonormal columns: distances are kept.
    return torch.from_numpy((2.0 * bits - 1.0) @ embed.T).to(torch.float32)


DATASETS = {
    'ring8':   lambda: ModeDataset('ring8',  _ring(), 0.02,
                                   '8 Gaussians on a circle of radius 1, sigma 0.02.'),
    'grid25':  lambda: ModeDataset('grid25', _grid(), 0.05,
                                   '5 x 5 grid of Gaussians, spacing 1, sigma 0.05.'),
    'cube100': lambda: ModeDataset('cube100', _cube(), 0.05,
                                   '100 random corners of the 10-D hypercube {-1, 1}^10, embedded in 64-D by a fixed '
                                   'orthonormal map, sigma 0.05 in all 64 dimensions (modes at least 2 apart).'),
}

#----------------------------------------------------------------------------
# Metrics on samples of a known mixture.

def mode_statistics(samples: torch.Tensor, dataset: ModeDataset, min_count: int) -> Dict[str, float]:
    """Mode figures of generated samples, as the GAN mode-collapse literature counts them (e.g. PacGAN), with the
    3-sigma radius generalised to D dimensions.

    Each sample is assigned to its nearest mode. It is high-quality if it lies within `dataset.radius`
    of that mode (3 sigma in 2-D). A mode is covered if at least `min_count` high-quality samples are
    assigned to it. The KL divergence is KL(p || uniform) of the histogram p of all samples over their
    nearest modes: 0 for a perfectly balanced generator, log(modes) when every sample goes to one mode.

    Args:
        samples: [num, dim] generated samples.
        dataset: The true mixture.
        min_count: High-quality samples a mode needs to count as covered.
    Returns:
        dict(covered=..., covered_share=..., high_quality=..., kl_uniform=...), Python numbers.
    """
    if samples.ndim != 2 or samples.shape[1] != dataset.dim or samples.shape[0] == 0:
        raise ValueError(f'expected [num, {dataset.dim}] samples, got {list(samples.shape)}')
    distance = torch.cdist(samples.to(torch.float64), dataset.means.to(torch.float64))
    nearest_distance, nearest = distance.min(dim=1)
    high_quality = nearest_distance <= dataset.radius
    high_quality_counts = torch.bincount(nearest[high_quality], minlength=dataset.modes)
    p = torch.bincount(nearest, minlength=dataset.modes).to(torch.float64) / samples.shape[0]
    p = p[p > 0]
    covered = int((high_quality_counts >= min_count).sum())
    return dict(
        covered       = covered,
        covered_share = covered / dataset.modes,
        high_quality  = float(high_quality.to(torch.float64).mean()),
        kl_uniform    = max(0.0, float((p * (p * dataset.modes).log()).sum())),
    )

#----------------------------------------------------------------------------
# Networks. The decoder and the discriminator are plain PyTorch MLPs (nn.Linear, leaky ReLU 0.2), the
# same for every mapper; the mappers keep StyleGAN's equalized learning rate at `mapper_lr_multiplier`.

def mlp(features: Sequence[int]) -> torch.nn.Sequential:
    """nn.Linear layers with leaky ReLU (0.2) between them, none after the last."""
    layers = []
    for a, b in zip(features[:-1], features[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.LeakyReLU(0.2)]
    return torch.nn.Sequential(*layers[:-1])


def build_mapper(name: str, z_dim: int, tokens: int, lr_multiplier: float) -> torch.nn.Module:
    """A mapper of MAPPERS, z [batch, z_dim] -> w [batch, z_dim]."""
    spec = MAPPERS[name]
    if spec['kind'] == 'mlp':
        return ReferenceMLP(z_dim, z_dim, spec['layers'], lr_multiplier=lr_multiplier)
    if z_dim % tokens != 0:
        raise ValueError(f'z_dim={z_dim} must split into {tokens} tokens')
    return RecursiveTokenMapper(z_dim, z_dim, tokens=tokens, token_dim=z_dim // tokens, steps=spec['steps'], lr_multiplier=lr_multiplier)


class Generator(torch.nn.Module):
    """Mapper, then the fixed-width decoder w -> x."""

    def __init__(self, mapper: torch.nn.Module, decoder: torch.nn.Module):
        super().__init__()
        self.mapper = mapper
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.mapper(z))


def build_networks(mapper_name: str, dataset: ModeDataset, seed: int, cfg: dict):
    """(G, D) of one seed. The decoder and D are drawn first from the seed alone, so every mapper of a
    seed starts from the same decoder and discriminator; the mapper is drawn after them."""
    torch.manual_seed(seed)
    decoder = mlp([cfg['z_dim'], cfg['hidden'], cfg['hidden'], dataset.dim])
    discriminator = mlp([dataset.dim, cfg['hidden'], cfg['hidden'], 1])
    mapper = build_mapper(mapper_name, cfg['z_dim'], cfg['tokens'], cfg['mapper_lr_multiplier'])
    return Generator(mapper, decoder), discriminator


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def network_params(mapper_name: str, dataset: ModeDataset, cfg: dict) -> Dict[str, int]:
    """Parameter counts of one run's mapper, decoder and discriminator (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        G, D = build_networks(mapper_name, dataset, 0, cfg)
    return dict(mapper=count_params(G.mapper), decoder=count_params(G.decoder), discriminator=count_params(D))


class Stacked:
    """The same network for several seeds, run as one: parameters stacked along a new first axis and
    the module vmapped over it (torch.func). Each seed's slice computes what its own module would (up to
    float rounding); Adam, being elementwise, updates each slice as a separate Adam would."""

    def __init__(self, modules: List[torch.nn.Module]):
        self.params, self.buffers = torch.func.stack_module_state(modules)
        base = copy.deepcopy(modules[0]).to('meta')
        self._call = torch.func.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(self.params, self.buffers, x)

    def requires_grad_(self, flag: bool) -> None:
        for p in self.params.values():
            p.requires_grad_(flag)

#----------------------------------------------------------------------------
# One mapper on one dataset, all seeds at once.

@dataclasses.dataclass
class Group:
    """One GAN per seed for one mapper on one dataset, the seeds stacked into one computation (Stacked),
    with each seed's own streams of real batches and latents."""
    seeds:          List[int]
    G:              Stacked
    D:              Stacked
    opt_G:          torch.optim.Optimizer
    opt_D:          torch.optim.Optimizer
    data_gens:      List[torch.Generator]   # Real batches of each seed.
    z_gens:         List[torch.Generator]   # Latents of each seed.
    mapper_start:   Dict[str, torch.Tensor] # The mappers' weights before training.

    @staticmethod
    def build(dataset: ModeDataset, mapper_name: str, seeds: List[int], cfg: dict) -> 'Group':
        networks = [build_networks(mapper_name, dataset, seed, cfg) for seed in seeds]
        G = Stacked([g for g, _ in networks])
        D = Stacked([d for _, d in networks])
        return Group(
            seeds        = seeds,
            G            = G,
            D            = D,
            opt_G        = torch.optim.Adam(G.params.values(), lr=cfg['lr_g'], betas=tuple(cfg['betas'])),
            opt_D        = torch.optim.Adam(D.params.values(), lr=cfg['lr_d'], betas=tuple(cfg['betas'])),
            data_gens    = [torch.Generator().manual_seed(2 * seed) for seed in seeds],
            z_gens       = [torch.Generator().manual_seed(2 * seed + 1) for seed in seeds],
            mapper_start = {k: v.detach().clone() for k, v in G.params.items() if k.startswith('mapper.')},
        )

    def gan_step(self, dataset: ModeDataset, cfg: dict) -> None:
        """One D step and one G step on the same G(z), for every seed at once."""
        G, D, batch = self.G, self.D, cfg['batch']
        real = torch.stack([dataset.sample(batch, g) for g in self.data_gens]).requires_grad_(True)
        fake = G(torch.stack([torch.randn([batch, cfg['z_dim']], generator=g) for g in self.z_gens]))

        # D step: logistic loss and R1 on the real batch. Losses are means per seed, summed over
        # seeds, so that each seed's parameters get exactly the gradient of their own loss.
        D.requires_grad_(True)
        real_logits = D(real)
        r1_grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
        loss_D = (F.softplus(D(fake.detach())) + F.softplus(-real_logits)).mean(dim=(1, 2)).sum()
        loss_D = loss_D + cfg['r1_gamma'] / 2 * r1_grad.square().sum(dim=2).mean(dim=1).sum()
        self.opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        self.opt_D.step()

        # G step: non-saturating loss through the updated D.
        D.requires_grad_(False)
        loss_G = F.softplus(-D(fake)).mean(dim=(1, 2)).sum()
        self.opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        self.opt_G.step()

    def samples(self, dataset: ModeDataset, cfg: dict):
        """([seeds, samples_per_mode * modes, dim] generated samples, [prdc_samples, dim] true samples per seed),
        from evaluation streams of each seed's own."""
        eval_gens = [torch.Generator().manual_seed(1_000_000 + seed) for seed in self.seeds]
        num_eval = cfg['samples_per_mode'] * dataset.modes
        with torch.no_grad():
            samples = self.G(torch.stack([torch.randn([num_eval, cfg['z_dim']], generator=g) for g in eval_gens]))
            references = [dataset.sample(cfg['prdc_samples'], g) for g in eval_gens]
        return samples, references

    def mapper_weight_change(self, i: int) -> float:
        """|theta - theta_0| / |theta_0| of seed i's mapper weights."""
        change = sum((self.G.params[k][i] - v[i]).square().sum() for k, v in self.mapper_start.items())
        size = sum(v[i].square().sum() for v in self.mapper_start.values())
        return float((change / size).sqrt().detach())


def train_group(dataset_name: str, mapper_name: str, seeds: Sequence[int], cfg: dict) -> List[dict]:
    """Train one GAN per seed and measure each. Runs on one CPU thread (restored afterwards, as is the
    global RNG), so the figures do not depend on the machine's core count or on the number of workers.

    The loss is StyleGAN2's: non-saturating logistic for G, logistic for D with R1 on real samples
    (gamma / 2 * |grad D(x)|^2, on every D step). Each step draws, per seed, one real batch and one
    latent batch from the seed's own generators (so identical for every mapper of a seed), takes a
    D step on G(z) and then a G step on the same G(z) (G's weights do not change in between).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):   # build_networks seeds the global RNG; the caller's state is kept.
            return _train_group(DATASETS[dataset_name](), mapper_name, list(seeds), cfg)
    finally:
        torch.set_num_threads(threads)


def _train_group(dataset: ModeDataset, mapper_name: str, seeds: List[int], cfg: dict) -> List[dict]:
    group = Group.build(dataset, mapper_name, seeds, cfg)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(cfg['steps']):
        group.gan_step(dataset, cfg)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    samples, references = group.samples(dataset, cfg)
    runs = []
    for i, seed in enumerate(seeds):
        runs.append(dict(
            dataset       = dataset.name,
            mapper        = mapper_name,
            seed          = seed,
            figures       = evaluate(samples[i], references[i], dataset, cfg),
            mapper_weight_change = group.mapper_weight_change(i),
            plot          = samples[i, :cfg['plot_samples']].tolist() if dataset.dim == 2 else None,
            train_seconds_group     = train_seconds,
            train_cpu_seconds_group = train_cpu_seconds,
        ))
    return runs


def evaluate(samples: torch.Tensor, reference: torch.Tensor, dataset: ModeDataset, cfg: dict) -> Dict[str, float]:
    """Mode figures and PRDC of one run's samples; a run whose samples are not finite scores as a total failure."""
    if not bool(torch.isfinite(samples).all()):
        return dict(covered=0, covered_share=0.0, high_quality=0.0, kl_uniform=math.log(dataset.modes),
                    precision=0.0, recall=0.0, density=0.0, coverage=0.0)
    figures = mode_statistics(samples, dataset, cfg['min_count'])
    figures.update(prdc(reference, samples[:cfg['prdc_samples']], k=cfg['prdc_k']))
    return figures

#----------------------------------------------------------------------------
# Statistics over seeds.

METRICS = ('covered', 'high_quality', 'kl_uniform', 'precision', 'recall', 'density', 'coverage')


def bootstrap_median(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE) -> Dict[str, float]:
    """Median of `values` and its percentile-bootstrap interval (resampling the values, i.e. the seeds,
    with replacement). The bootstrap RNG is fixed, so the same values always give the same interval.
    With 5 seeds the interval can only fall on the values themselves or midpoints between them: it is
    a coarse interval, not a precise one."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError('bootstrap_median needs a non-empty list of numbers')
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    medians = np.median(v[rng.integers(0, v.size, size=(resamples, v.size))], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return dict(median=float(np.median(v)), low=float(low), high=float(high))


def summarize(runs: List[dict], baseline: Optional[str] = BASELINE) -> Dict[str, Dict[str, dict]]:
    """dataset -> mapper -> dict(metrics={metric: bootstrap_median}, paired={metric: bootstrap_median
    of the per-seed differences mapper - baseline}, seeds=[...]). `paired` is left out for the baseline
    itself and when the baseline was not run."""
    summary = {}
    for run in runs:
        summary.setdefault(run['dataset'], {}).setdefault(run['mapper'], []).append(run)
    out = {}
    for dataset, by_mapper in summary.items():
        out[dataset] = {}
        base = {r['seed']: r['figures'] for r in by_mapper.get(baseline, [])}
        for mapper, group in by_mapper.items():
            group = sorted(group, key=lambda r: r['seed'])
            entry = dict(seeds=[r['seed'] for r in group],
                         metrics={m: bootstrap_median([r['figures'][m] for r in group]) for m in METRICS})
            if base and mapper != baseline:
                paired = [r for r in group if r['seed'] in base]
                entry['paired'] = {m: bootstrap_median([r['figures'][m] - base[r['seed']][m] for r in paired]) for m in METRICS}
                entry['paired_seeds'] = [r['seed'] for r in paired]
            out[dataset][mapper] = entry
    return out

#----------------------------------------------------------------------------
# Reports.

def _interval(s: dict, digits: int) -> str:
    fmt = f'{{:.{digits}f}}'
    return f'{fmt.format(s["median"])} [{fmt.format(s["low"])}, {fmt.format(s["high"])}]'


def _signed_interval(s: dict, digits: int) -> str:
    fmt = f'{{:+.{digits}f}}'
    return f'{fmt.format(s["median"])} [{fmt.format(s["low"])}, {fmt.format(s["high"])}]'


DIGITS = dict(covered=1, high_quality=2, kl_uniform=2, precision=2, recall=2, density=2, coverage=2)
HEADERS = dict(covered='modes covered', high_quality='high-quality', kl_uniform='KL to uniform', precision='precision',
               recall='recall', density='density', coverage='coverage')


def markdown(results: dict) -> str:
    """Per dataset: the medians over seeds with their bootstrap intervals, and the paired differences against the baseline."""
    cfg = results['config']
    lines = [f'Medians over {cfg["seeds"]} seeds, [{CONFIDENCE:.0%} percentile-bootstrap interval over seeds]; '
             f'{cfg["steps"]} D and G steps of batch {cfg["batch"]} per run.']
    for name, by_mapper in results['summary'].items():
        info = results['datasets'][name]
        lines += ['', f'**{name}** ({info["modes"]} modes, {info["dim"]}-D): {info["doc"]}', '',
                  '| mapper | params | ' + ' | '.join(HEADERS[m] for m in METRICS) + ' |',
                  '|---|---:|' + '---:|' * len(METRICS)]
        for mapper, entry in by_mapper.items():
            cells = [_interval(entry['metrics'][m], DIGITS[m]) for m in METRICS]
            lines.append(f'| {mapper} | {results["mappers"][mapper]["params"]:,} | ' + ' | '.join(cells) + ' |')
        paired = [(mapper, entry) for mapper, entry in by_mapper.items() if 'paired' in entry]
        if paired:
            lines += ['', f'Paired differences against {results["baseline"]} (same seeds: same data, latents, decoder and '
                          'discriminator start), median [interval]:', '',
                      '| mapper | ' + ' | '.join(HEADERS[m] for m in METRICS) + ' |', '|---|' + '---:|' * len(METRICS)]
            for mapper, entry in paired:
                lines.append(f'| {mapper} | ' + ' | '.join(_signed_interval(entry['paired'][m], DIGITS[m]) for m in METRICS) + ' |')
    return '\n'.join(lines) + '\n'


def scatter_png(path: str, dataset: ModeDataset, runs: List[dict], mappers: List[str], panel: int = 170) -> None:
    """One panel per (mapper, seed): rows are mappers, columns seeds. Red circles: the modes' high-quality
    radius; dots: generated samples; text: mapper, seed, modes covered, high-quality share."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=11)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font.
        font = ImageFont.load_default()
    seeds = sorted({r['seed'] for r in runs})
    by_key = {(r['mapper'], r['seed']): r for r in runs}
    extent = float(dataset.means.abs().max()) * 1.25 + 0.3
    scale = (panel - 1) / (2 * extent)
    image = Image.new('RGB', (panel * len(seeds), panel * len(mappers)), 'white')
    draw = ImageDraw.Draw(image)

    def to_px(x: float, y: float, ox: int, oy: int):
        return ox + (x + extent) * scale, oy + (extent - y) * scale

    for row, mapper in enumerate(mappers):
        for col, seed in enumerate(seeds):
            ox, oy = col * panel, row * panel
            draw.rectangle([ox, oy, ox + panel - 1, oy + panel - 1], outline=(200, 200, 200))
            r = max(2.0, dataset.radius * scale)
            for mx, my in dataset.means.tolist():
                cx, cy = to_px(mx, my, ox, oy)
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(220, 40, 40))
            run = by_key.get((mapper, seed))
            if run is None:
                continue
            for x, y in run['plot']:
                if abs(x) < extent and abs(y) < extent:
                    px, py = to_px(x, y, ox, oy)
                    draw.rectangle([px, py, px + 1, py + 1], fill=(20, 60, 160))
            f = run['figures']
            draw.text((ox + 4, oy + 3), f'{mapper}, seed {seed}', fill='black', font=font)
            draw.text((ox + 4, oy + panel - 16), f'{f["covered"]}/{dataset.modes} modes, HQ {f["high_quality"]:.2f}', fill='black', font=font)
    image.save(path, optimize=True)

#----------------------------------------------------------------------------
# The whole experiment.

def _group_cost(group) -> float:
    """Rough relative cost, to start the slowest groups first."""
    dataset, mapper = group
    spec = MAPPERS[mapper]
    return (spec.get('steps', 1) * 2 + spec.get('layers', 0)) * (2 if dataset == 'cube100' else 1)


def _run_group(args):
    return train_group(*args)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (the workers)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_experiment(datasets: Sequence[str], mappers: Sequence[str], cfg: dict, workers: int, log=None) -> dict:
    """Train every mapper on every dataset for seeds 0 ... cfg['seeds'] - 1; returns the results dict
    (config, datasets, mappers, runs, summary, timing, machine) that `write_outputs` saves."""
    seeds = list(range(cfg['seeds']))
    jobs = [(d, m, seeds, cfg) for d, m in sorted(((d, m) for d in datasets for m in mappers), key=_group_cost, reverse=True)]
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    runs = []
    pool = multiprocessing.get_context('spawn').Pool(min(workers, len(jobs))) if workers > 1 else None
    with pool or contextlib.nullcontext():
        for i, group_runs in enumerate(pool.imap_unordered(_run_group, jobs) if pool else map(_run_group, jobs), start=1):
            runs += group_runs
            if log:
                first = group_runs[0]
                log(f'[{i}/{len(jobs)}] {first["dataset"]} {first["mapper"]}: {first["train_seconds_group"]:.0f} s')
    wall, cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu_start
    order = {(d, m): i for i, (d, m) in enumerate((d, m) for d in datasets for m in mappers)}
    runs.sort(key=lambda r: (order[r['dataset'], r['mapper']], r['seed']))

    first = {(r['dataset'], r['mapper']): r for r in reversed(runs)}
    baseline = BASELINE if BASELINE in mappers else None
    return dict(
        config   = dict(cfg, seed_list=seeds),
        baseline = baseline,
        datasets = _dataset_info(datasets, mappers[0], cfg),
        mappers  = {m: dict(MAPPERS[m], params=network_params(m, DATASETS[datasets[0]](), cfg)['mapper']) for m in mappers},
        runs     = runs,
        summary  = summarize(runs, baseline),
        timing   = dict(wall_seconds=wall, cpu_seconds=cpu_seconds, workers=workers, threads_per_worker=1,
                        train_seconds={f'{d} / {m}': first[d, m]['train_seconds_group'] for d in datasets for m in mappers},
                        train_cpu_seconds={f'{d} / {m}': first[d, m]['train_cpu_seconds_group'] for d in datasets for m in mappers}),
        machine  = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                        cpu_count=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                        numpy=np.__version__, rtm_mapping=__version__),
    )


def _dataset_info(datasets: Sequence[str], mapper: str, cfg: dict) -> Dict[str, dict]:
    """Each dataset's modes, dimension, sigma, high-quality radius, description, and decoder and discriminator sizes."""
    info = {}
    for d in datasets:
        ds = DATASETS[d]()
        counts = network_params(mapper, ds, cfg)
        info[d] = dict(modes=ds.modes, dim=ds.dim, std=ds.std, high_quality_radius=ds.radius, doc=ds.doc,
                       decoder_params=counts['decoder'], discriminator_params=counts['discriminator'])
    return info


def write_outputs(results: dict, out_dir: str) -> Dict[str, str]:
    """Write mode-coverage.json, mode-coverage.md and one scatter PNG per 2-D dataset into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    paths = dict(json=os.path.join(out_dir, 'mode-coverage.json'), markdown=os.path.join(out_dir, 'mode-coverage.md'))
    for name, info in results['datasets'].items():
        if info['dim'] == 2:
            path = os.path.join(out_dir, f'mode-coverage-{name}.png')
            scatter_png(path, DATASETS[name](), [r for r in results['runs'] if r['dataset'] == name], list(results['mappers']))
            paths[f'png_{name}'] = path
    saved = dict(results, runs=[{k: v for k, v in r.items() if k != 'plot'} for r in results['runs']])
    with open(paths['json'], 'w') as f:
        json.dump(saved, f, indent=1)
    with open(paths['markdown'], 'w') as f:
        f.write(markdown(results))
    return paths

#----------------------------------------------------------------------------
# Command line.

def _full(key: str) -> str:
    return f'[default: {RUNS["full"][key]}; --quick: {RUNS["quick"][key]}]'


@click.command()
@click.pass_context
@click.option('--out',      type=click.Path(file_okay=False), default='mode-coverage', show_default=True, help='Output folder (JSON, markdown, PNGs).')
@click.option('--dataset', 'datasets', type=click.Choice(list(DATASETS)), multiple=True, default=tuple(DATASETS), show_default=True,
              help='Distributions to train on (repeat the option for several).')
@click.option('--mapper', 'mappers', type=click.Choice(list(MAPPERS)), multiple=True, default=tuple(MAPPERS), show_default=True,
              help='Mappers to compare (repeat the option for several); paired differences need MLP-2.')
@click.option('--seeds',    type=click.IntRange(min=1), default=None, help=f'Seeds 0 ... N-1, the same for every mapper  {_full("seeds")}')
@click.option('--steps',    type=click.IntRange(min=1), default=None, help=f'D steps = G steps per run  {_full("steps")}')
@click.option('--mapper-lr-multiplier', type=click.FloatRange(min=0, min_open=True), default=None,
              help=f'Equalized-lr multiplier of the mappers, MLP and RTM alike  {_full("mapper_lr_multiplier")}')
@click.option('--workers',  type=click.IntRange(min=1), default=2, show_default=True, help='Parallel processes, one CPU thread each.')
@click.option('--quick',    is_flag=True, help='Tiny settings: a smoke test of the pipeline, not a measurement.')
def mode_coverage(ctx, out, datasets, mappers, seeds, steps, mapper_lr_multiplier, workers, quick):
    """Toy GAN on CPU: modes covered by RTM against the MLP mapper.

    Trains a generator (mapper, then the same small MLP decoder) with the StyleGAN2 loss on mixtures
    with known modes, for every mapper and seed, and writes the medians over seeds with bootstrap
    intervals, the paired differences against the 2-layer MLP, and scatter plots of the samples.
    """
    cfg = dict(RUNS['quick' if quick else 'full'])
    for key, value in dict(seeds=seeds, steps=steps, mapper_lr_multiplier=mapper_lr_multiplier).items():
        if value is not None:
            cfg[key] = value
    cfg['betas'] = list(cfg['betas'])
    if not hasattr(torch, 'func'):
        raise click.ClickException(f'mode-coverage runs the seeds through torch.func (torch >= 2.0); this is torch {torch.__version__}: '
                                   'install a newer torch, e.g. pip install torch==2.13.0.')
    datasets = list(dict.fromkeys(datasets))
    mappers = list(dict.fromkeys(mappers))
    if cfg['seeds'] < 2:
        raise click.ClickException('--seeds must be at least 2 for an interval over seeds; the default is 5.')
    for m in mappers:
        click.echo(f'{m}: {network_params(m, DATASETS[datasets[0]](), cfg)["mapper"]:,} mapper parameters', err=True)
    results = run_experiment(datasets, mappers, cfg, workers, log=lambda s: click.echo(s, err=True))
    results['command'] = ' '.join(['rtm-mapping', ctx.info_name] + [shlex.quote(a) for a in sys.argv[2:]]) if ctx.info_name else None
    results['date'] = datetime.now(timezone.utc).isoformat(timespec='seconds')
    paths = write_outputs(results, out)
    click.echo(markdown(results))
    timing = results['timing']
    click.echo(f'{timing["wall_seconds"]:.0f} s wall time with {workers} workers, {timing["cpu_seconds"]:.0f} CPU seconds. Wrote '
               + ', '.join(paths.values()), err=True)

#----------------------------------------------------------------------------
