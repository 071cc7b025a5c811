"""The RS-IMLE part of `rtm-mapping bench` (`--part imle`): what the RTM mapper costs an RS-IMLE generator,
and how fast the sampler's exact nearest-neighbour search runs.

  generator  time per generated image, App. H's protocol: the whole generator, EMA weights (in eval mode;
             the weights' values do not change the time), no gradient, one forward pass over a batch of z
             between two device synchronisations, divided by the batch; the median over REPEATS passes after
             WARMUP. Batch 64 for the CIFAR-10 decoder, 16 for the 256 px ones. For each decoder of App. C,
             its RTM config (training_configs/*-imle-rtm) against its MLP baseline (*-imle-mlp), the two timed
             alternately (A B, then B A), so that machine noise hits both alike.
  search     rtm_mapping.imle.sampler.match (the rejection rule and each image's nearest remaining sample) of
             n data features against m = pool_size_for(n, force_factor) pool features of dimension 800, at
             CIFAR-10's settings (n = 50,000, m = 500,736, epsilon and knn_ignore of cifar10-imle-rtm), against
             one plain float32 matrix product of the same shape, [n, 800] x [800, m] (in the sampler's own
             blocks, search_blocks, when the whole [n, m] product does not fit its memory budget). The target:
             the search takes at most twice the product's time (throughput at least half of it).
             Memory: on CUDA, torch.cuda.max_memory_allocated during the call less what was allocated before;
             on every device, the peak of the bytes held by tensors the call's aten operations create
             (outputs followed until freed, at the dispatcher: workspaces inside an operation are not seen)
             and the largest one of them; beside them, the bytes an n x m float32 matrix would take.
             The features are synthetic unit vectors: the data random, half the pool random and half near a
             data point (at about epsilon, so that the rejection rule removes some).

The full settings are the paper's (App. H; CIFAR-10's n and m) and are meant for a GPU; on a CPU pass the
reduced ones (--imle-width-div, --imle-batch-div, --imle-repeats, --imle-warmup, --imle-search-images) or
--quick. A decoder at reduced width keeps its full mapper, so RTM's share of the time grows.
"""

import dataclasses
import statistics
import weakref
from typing import List, Tuple

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rtm_mapping import configs
from rtm_mapping.bench.targets import Limit

TITLE = 'RS-IMLE generator time per image (App. H) and nearest-neighbour search'

# decoder: (RTM config, MLP config, batch of App. H, the paper's ms per image on one H100 (MLP, RTM) or None).
DECODERS = {
    'cifar10':  ('cifar10-imle-rtm',    'cifar10-imle-mlp',    64, (6.4, 6.7)),     # Table 1
    'celebahq': ('celebahq256-imle-rtm', 'celebahq256-imle-mlp', 16, (18.1, 19.6)),  # Table 2
    'fewshot':  ('fewshot-imle-rtm',    'fewshot-imle-mlp',    16, None),           # Table 5 (no latency given)
}
SEARCH_CONFIG = 'cifar10-imle-rtm'      # epsilon, knn_ignore, force_factor of the search part
TARGETS = {
    'search_over_product': Limit(2.0, 'ratio'),     # search time / plain product time (throughput at least 1/2 of the product's)
}

RUNS = {
    'full':  dict(repeats=200, warmup=20, width_div=1, batch_div=1, search_images=50000, search_repeats=3),
    'quick': dict(repeats=2,   warmup=1,  width_div=32, batch_div=16, search_images=256, search_repeats=1),
}


@dataclasses.dataclass(frozen=True)
class IMLESettings:
    device:         torch.device
    quick:          bool
    decoders:       Tuple[str, ...]     # Decoders of the generator part.
    repeats:        int                 # Timed forward passes of each generator (App. H: 200).
    warmup:         int                 # Untimed passes first (App. H: 20).
    width_div:      int                 # Decoder width divided by this (1 = the paper's).
    batch_div:      int                 # App. H's batch divided by this (at least 1 image).
    search_images:  int                 # n of the search part; m = pool_size_for(n, force_factor).
    search_repeats: int                 # Timed calls of the search and of the product (after one untimed each).

    @property
    def at_paper_settings(self) -> bool:
        return not self.quick and self.width_div == 1 and self.batch_div == 1 and self.search_images == RUNS['full']['search_images']


def settings(device, quick: bool = False, decoders=tuple(DECODERS), **given) -> IMLESettings:
    """Each setting given (not None), else its RUNS default (full or quick)."""
    run = dict(RUNS['quick' if quick else 'full'])
    run.update({key: value for key, value in given.items() if value is not None})
    return IMLESettings(device=torch.device(device), quick=quick, decoders=tuple(decoders), **run)


def options(fn):
    """The command-line options of this part (`rtm-mapping bench --imle-...`), as one decorator."""
    def full(key):
        return f'[default: {RUNS["full"][key]}; --quick: {RUNS["quick"][key]}]'
    for name, kind, text in reversed([
        ('decoder',       click.Choice(list(DECODERS)), 'Decoders of the imle part (repeatable)  [default: all]'),
        ('repeats',       click.IntRange(min=1), f'imle part: timed forward passes of each generator  {full("repeats")}'),
        ('warmup',        click.IntRange(min=0), f'imle part: warm-up passes  {full("warmup")}'),
        ('width-div',     click.IntRange(min=1), f'imle part: decoder width divided by this  {full("width_div")}'),
        ('batch-div',     click.IntRange(min=1), f'imle part: App. H\'s batch divided by this  {full("batch_div")}'),
        ('search-images', click.IntRange(min=16), f'imle part: data features n of the search  {full("search_images")}'),
    ]):
        fn = click.option(f'--imle-{name}', f'imle_{name.replace("-", "_")}', type=kind, default=None, multiple=(name == 'decoder'),
                          help=text)(fn)
    return fn


def settings_from_options(device, quick: bool, params: dict) -> IMLESettings:
    """Settings from the values of options() (keys imle_*) among a command's params."""
    return settings(device, quick, decoders=params.get('imle_decoder') or tuple(DECODERS), repeats=params.get('imle_repeats'),
                    warmup=params.get('imle_warmup'), width_div=params.get('imle_width_div'), batch_div=params.get('imle_batch_div'),
                    search_images=params.get('imle_search_images'))

#----------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

#----------------------------------------------------------------------------
# Generator part.

def generator_kwargs(config_name: str, width_div: int = 1) -> dict:
    """Generator(**kwargs) of an RS-IMLE config as `rtm-mapping imle train` builds it, the decoder's width divided by width_div."""
    from rtm_mapping.imle import networks, train
    config = configs.load_config(config_name, regime='imle')
    options = train.training_options(train.validate_settings(config['imle'], config_name), data='', snap=1, seed=0,
                                     batch_gpu=None, pool_batch=1, subset=None)
    kwargs = dict(options.G_kwargs)
    if width_div > 1:
        width = networks.decoder_architecture(kwargs['decoder'], kwargs['decoder_kwargs'])['width']
        kwargs['decoder_kwargs'] = dict(kwargs['decoder_kwargs'] or {}, width=max(4, width // width_div))
    return kwargs


def bench_decoder(decoder: str, run: IMLESettings) -> dict:
    """App. H's time per image of one decoder with the RTM mapper and with the MLP mapper."""
    from rtm_mapping.bench.probes import time_interleaved  # imported here: rtm_mapping.bench imports this module
    from rtm_mapping.imle import networks
    rtm_config, mlp_config, batch, paper = DECODERS[decoder]
    batch = max(1, batch // run.batch_div)
    arms = {}
    for arm, name in (('RTM', rtm_config), ('MLP', mlp_config)):
        kwargs = generator_kwargs(name, run.width_div)
        torch.manual_seed(0)
        G = networks.Generator(**kwargs).eval().requires_grad_(False).to(run.device)
        arms[arm] = dict(G=G, kwargs=kwargs, z=torch.randn([batch, G.z_dim], device=run.device))

    def forward(arm):
        def call():
            with torch.no_grad():
                arms[arm]['G'](arms[arm]['z'])
        return call
    times = time_interleaved({arm: forward(arm) for arm in arms}, run.repeats, run.warmup, run.device)
    rows = []
    for arm, a in arms.items():
        G = a['G']
        rows.append(dict(mapper=arm, config=rtm_config if arm == 'RTM' else mlp_config,
                         steps=G.mapping.steps if arm == 'RTM' else None, inner_steps=G.mapping.inner_steps if arm == 'RTM' else None,
                         mlp_layers=G.mapping.num_layers if arm == 'MLP' else None,
                         mapper_params=sum(p.numel() for p in G.mapping.parameters()),
                         decoder_params=sum(p.numel() for p in G.synthesis.parameters()),
                         ms_per_image=statistics.median(times[arm]) * 1e3 / batch))
    width = networks.decoder_architecture(decoder, arms['RTM']['kwargs']['decoder_kwargs'])['width']
    ratio = statistics.median(r / m for r, m in zip(times['RTM'], times['MLP']))      # paired, one per repeat
    return dict(decoder=decoder, batch=batch, width=width, resolution=arms['RTM']['G'].img_resolution, rows=rows,
                rtm_overhead=ratio - 1, paper_ms_per_image=None if paper is None else dict(MLP=paper[0], RTM=paper[1]))

#----------------------------------------------------------------------------
# Search part.

class LiveBytes(TorchDispatchMode):
    """Bytes held by the tensors that aten operations return while the mode is on: each new storage is counted
    when it appears and uncounted when the last tensor seen on it is freed. peak, and the largest single one."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.storages = {}      # data_ptr: [bytes, tensors alive]

    def _release(self, ptr: int) -> None:
        entry = self.storages[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = set()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or id(t) in seen:
                continue
            seen.add(id(t))
            ptr = t.untyped_storage().data_ptr()
            nbytes = t.untyped_storage().nbytes()
            if ptr == 0 or nbytes == 0:
                continue
            if ptr not in self.storages:
                if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == ptr for a in tree_flatten((args, kwargs))[0]):
                    continue        # an in-place op or a view of an input: no new memory
                self.storages[ptr] = [nbytes, 0]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.largest = max(self.largest, nbytes)
            self.storages[ptr][1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def search_features(n: int, m: int, dim: int, epsilon: float, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Synthetic unit vectors: data [n, dim] random; pool [m, dim], the first half random, the second half near
    data points (noise of norm about 1.5 epsilon, so that some fall within epsilon and are rejected)."""
    g = torch.Generator(device='cpu').manual_seed(0)
    data = torch.nn.functional.normalize(torch.randn([n, dim], generator=g), dim=1)
    pool = torch.randn([m, dim], generator=g)
    near = torch.arange(m // 2, m)
    pool[near] = data[near % n] + pool[near] * (1.5 * epsilon / dim ** 0.5) * torch.rand([near.numel(), 1], generator=g) * 2
    return data.to(device), torch.nn.functional.normalize(pool, dim=1).to(device)


def plain_product(x: torch.Tensor, y: torch.Tensor, memory_budget: int):
    """The reference: x @ y.T in float32 (no TF32), whole when the [n, m] result fits memory_budget, else over the
    sampler's own search blocks, each into a preallocated output of its shape; returns (call, description)."""
    from rtm_mapping.imle import sampler
    n, m, dim = x.shape[0], y.shape[0], x.shape[1]
    if n * m * 4 <= memory_budget:
        rb, cb = n, m
        what = f'[{n}, {dim}] x [{dim}, {m}], whole'
    else:
        rb, cb = sampler.search_blocks(n, m, dim, memory_budget=memory_budget)
        what = f'[{n}, {dim}] x [{dim}, {m}] in blocks of [{rb}, {cb}] (the whole product would take {n * m * 4 / 2**30:.1f} GiB)'
    yt = y.t()
    blocks = [(x[r:r + rb], yt[:, c:c + cb]) for c in range(0, m, cb) for r in range(0, n, rb)]
    outputs = {shape: torch.empty(shape, device=x.device) for shape in {(a.shape[0], b.shape[1]) for a, b in blocks}}

    def call():
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision('highest')
        try:
            for a, b in blocks:
                torch.mm(a, b, out=outputs[a.shape[0], b.shape[1]])
        finally:
            torch.set_float32_matmul_precision(previous)
    return call, what


def bench_search(run: IMLESettings) -> dict:
    """sampler.match against one plain matrix product of the same shape, and match's memory."""
    from rtm_mapping.bench.probes import time_interleaved
    from rtm_mapping.imle import sampler, train
    config = configs.load_config(SEARCH_CONFIG, regime='imle')['imle']
    settings_ = train.validate_settings(config, SEARCH_CONFIG)
    epsilon, knn_ignore, force_factor = settings_['epsilon'], settings_['knn_ignore'], settings_['force_factor']
    n = run.search_images
    m = sampler.pool_size_for(n, force_factor)
    dim = sampler.FEATURE_DIM
    data, pool = search_features(n, m, dim, epsilon, run.device)
    budget = sampler.default_memory_budget(run.device)

    def search():
        return sampler.match(data, pool, epsilon=epsilon, knn_ignore=knn_ignore, memory_budget=budget)
    product, product_what = plain_product(data, pool, budget)
    found = search()                                            # untimed: warm-up, and what it found
    times = time_interleaved(dict(search=search, product=product), run.search_repeats, 1, run.device)
    t_search, t_product = statistics.median(times['search']), statistics.median(times['product'])

    memory = LiveBytes()
    if run.device.type == 'cuda':
        _sync(run.device)
        torch.cuda.reset_peak_memory_stats(run.device)
        base = torch.cuda.memory_allocated(run.device)
    with memory:
        search()
    result = dict(n=n, m=m, dim=dim, epsilon=epsilon, knn_ignore=knn_ignore, force_factor=force_factor, config=SEARCH_CONFIG,
                  memory_budget=budget, product=product_what, search_ms=t_search * 1e3, product_ms=t_product * 1e3,
                  search_over_product=t_search / t_product, throughput_vs_product=t_product / t_search,
                  pairs_per_second=n * m / t_search, rejected=found.num_rejected, fallback_rows=found.fallback_rows,
                  peak_bytes=memory.peak, largest_bytes=memory.largest, full_matrix_bytes=n * m * 4)
    if run.device.type == 'cuda':
        _sync(run.device)
        result['cuda_peak_bytes'] = torch.cuda.max_memory_allocated(run.device) - base
    return result

#----------------------------------------------------------------------------
# The part, as `rtm-mapping bench` runs its parts.

DEFAULT = False     # run only when asked for (--part imle): its full settings are App. H's, for a GPU
USES_CHECKOUT = False   # pure PyTorch: no StyleGAN checkout is looked for when only this part runs


def measure_imle(run: IMLESettings) -> dict:
    out = dict(settings=dict(dataclasses.asdict(run), device=run.device.type, decoders=list(run.decoders)), generator=[])
    for decoder in run.decoders:
        click.echo(f'imle: generator {decoder} ...', err=True)
        out['generator'].append(bench_decoder(decoder, run))
    click.echo('imle: nearest-neighbour search ...', err=True)
    out['search'] = bench_search(run)
    return out


def measure(run, **options) -> dict:
    """The part's entry point as a part of `rtm-mapping bench`: run holds the bench's device and quick flag,
    options the values of this module's options() (imle_*)."""
    return measure_imle(settings_from_options(run.device, run.quick, options))


def targets(result: dict, run=None) -> List[dict]:
    """The search target, judged only at CIFAR-10's n and m and not with --quick."""
    s = result['search']
    at_settings = not result['settings']['quick'] and s['n'] == RUNS['full']['search_images']
    return [TARGETS['search_over_product'].judge(f'nearest-neighbour search time over one plain matrix product of its shape, '
                                                 f'n={s["n"]}, m={s["m"]}', s['search_over_product'], at_settings)]


def markdown(result: dict, meta=None) -> List[str]:
    """The part's tables (from its saved results alone)."""
    s = result['settings']
    out = [f'RS-IMLE generators, App. H: ms per image, median of {s["repeats"]} forward passes after {s["warmup"]} '
           f'(EMA generator, no gradient){"; decoder width / " + str(s["width_div"]) if s["width_div"] > 1 else ""}:', '',
           '| decoder | batch | width | mapper | mapper params | ms / image | RTM overhead (paired) | paper, H100 |',
           '|---|---:|---:|---|---:|---:|---:|---:|']
    for g in result['generator']:
        for r in g['rows']:
            mapper = f'RTM H={r["steps"]} L={r["inner_steps"]}' if r['mapper'] == 'RTM' else f'MLP {r["mlp_layers"]} layers'
            overhead = f'{g["rtm_overhead"]:+.1%}' if r['mapper'] == 'RTM' else ''
            paper = '' if g['paper_ms_per_image'] is None else f'{g["paper_ms_per_image"][r["mapper"]]} ms'
            out.append(f'| {g["decoder"]} ({g["resolution"]} px) | {g["batch"]} | {g["width"]} | {mapper} | {r["mapper_params"]:,} | '
                       f'{r["ms_per_image"]:.3f} | {overhead} | {paper} |')
    t = result['search']
    mib = 2 ** 20
    out += ['', f'Nearest-neighbour search (sampler.match, epsilon {t["epsilon"]}, knn_ignore {t["knn_ignore"]}) of n = {t["n"]:,} '
            f'against m = {t["m"]:,} features of {t["dim"]}, and one plain product {t["product"]}; medians:', '',
            '| search ms | product ms | throughput vs product | pairs / s | rejected | peak MiB (tensors) | largest MiB |'
            + (' CUDA peak MiB |' if 'cuda_peak_bytes' in t else '') + ' n x m float32 MiB |',
            '|---:|---:|---:|---:|---:|---:|---:|' + ('---:|' if 'cuda_peak_bytes' in t else '') + '---:|',
            f'| {t["search_ms"]:.1f} | {t["product_ms"]:.1f} | {t["throughput_vs_product"]:.2f}x | {t["pairs_per_second"]:.3g} | '
            f'{t["rejected"]:,} | {t["peak_bytes"] / mib:.1f} | {t["largest_bytes"] / mib:.1f} |'
            + (f' {t["cuda_peak_bytes"] / mib:.1f} |' if 'cuda_peak_bytes' in t else '') + f' {t["full_matrix_bytes"] / mib:,.0f} |']
    return out
