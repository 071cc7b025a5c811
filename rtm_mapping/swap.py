"""`rtm-mapping swap`, `info` and `set-h`: give a pretrained StyleGAN2-ADA or StyleGAN3 pickle an RTM mapper,
describe a pickle, and store another inference H in one.

`swap` builds the RTM generator of the old generator's family (rtm_mapping.networks.Generator for
StyleGAN2-ADA, networks_stylegan2/networks_stylegan3.Generator for StyleGAN3's --cfg=stylegan2 and
stylegan3-t/r) from the old generator's init_kwargs (so the pickle records the RTM class and
legacy.load_network_pkl(force_fp16=True) rebuilds it), copies the synthesis network, w_avg and the
label embedding bit for bit, and distils the RTM onto the old mapper of G_ema (rtm_mapping/distill.py).
G gets the same RTM (its own synthesis network, w_avg and embedding). D, the augment pipe and the
training-set record are written unchanged. The output pickle embeds core.py and the adapter
(torch_utils.persistence), so the official tools load it without rtm-mapping.
"""

import copy
import json
import os
import pickle
import time
from typing import Dict, Optional

import click
import numpy as np
import torch

from rtm_mapping import adapters, core, distill
from stylegan2_ada_patch import checkout

NETWORKS = ('G', 'D', 'G_ema')

#----------------------------------------------------------------------------
# Loading and checks.

def load_pickle(path: str) -> Dict:
    """legacy.load_network_pkl, with the errors a user can act on."""
    import legacy
    if not os.path.isfile(path):
        raise click.ClickException(f'{path} is not a file; pass a network pickle (network-snapshot-*.pkl).')
    loaded = checkout.loaded()
    try:
        with open(path, 'rb') as f:
            data = legacy.load_network_pkl(f)
    except ImportError as err:   # a module, or a name in one, that the other codebase has
        if 'filtered_lrelu' in str(err) or 'networks_stylegan' in str(err):
            raise click.ClickException(wrong_checkout(path, 'stylegan3')) from err
        raise click.ClickException(f'{path} needs a module the {checkout.CODEBASES[loaded].name} checkout lacks ({err}); pass a '
                                   f'StyleGAN2-ADA or StyleGAN3 pickle, and point --stylegan at the checkout that wrote it.') from err
    except KeyError as err:
        if err.args and err.args[0] in NETWORKS:
            raise click.ClickException(f'{path} has no {err.args[0]}; pass a snapshot written by train.py (a dict with G, D and G_ema).') from err
        raise click.ClickException(f'{path} is not a StyleGAN network pickle (KeyError: {err}); '
                                   f'pass a snapshot written by train.py (a dict with G, D and G_ema).') from err
    except (AssertionError, TypeError, pickle.UnpicklingError) as err:
        raise click.ClickException(f'{path} is not a StyleGAN network pickle ({type(err).__name__}: {err}); '
                                   f'pass a snapshot written by train.py (a dict with G, D and G_ema).') from err
    if not isinstance(data, dict) or not isinstance(data.get('G_ema'), torch.nn.Module):
        raise click.ClickException(f'{path} has no G_ema; pass a snapshot written by train.py (a dict with G, D and G_ema).')
    written_by = 'stylegan3' if any(is_stylegan3(data.get(name)) for name in NETWORKS) else 'stylegan2-ada'
    if written_by != loaded:
        raise click.ClickException(wrong_checkout(path, written_by))
    return data


def wrong_checkout(path: str, written_by: str) -> str:
    """What to tell a user who loads a pickle of one codebase with the other's checkout."""
    codebase = checkout.CODEBASES[written_by]
    return (f'{path} is a {codebase.name} pickle; point --stylegan (or ${codebase.env_var}) at a {codebase.name} checkout '
            f'({codebase.repo}): its networks need that code.')


def is_stylegan3(net) -> bool:
    """StyleGAN3's networks (networks_stylegan3.py and its networks_stylegan2.py) take update_emas,
    where StyleGAN2-ADA's take skip_w_avg_update."""
    src = getattr(net, '_orig_module_src', '') or ''
    return 'update_emas' in src


def official_generator(G) -> str:
    """The official generator class of a stock generator, a key of adapters.RTM_GENERATORS. A StyleGAN3
    synthesis network with an `input` layer is networks_stylegan3's, as gen_images.py tells them apart."""
    if not is_stylegan3(G):
        return 'training.networks.Generator'
    if hasattr(getattr(G, 'synthesis', None), 'input'):
        return 'training.networks_stylegan3.Generator'
    return 'training.networks_stylegan2.Generator'


def mapper_kind(G) -> str:
    mapping = getattr(G, 'mapping', None)
    if mapping is None:
        return 'none'
    if isinstance(getattr(mapping, 'rtm', None), torch.nn.Module):
        return 'rtm'
    return 'mlp'


def check_mlp_mappers(data: Dict, path: str) -> None:
    """Refuse a pickle whose G or G_ema has no MLP mapper to distil from."""
    for name in ('G', 'G_ema'):
        if name in data and mapper_kind(data[name]) == 'rtm':
            raise click.ClickException(f'{path} already has an RTM mapper; use `rtm-mapping set-h` to change its H, '
                                       f'or pass a pickle with the MLP mapper.')
        if name in data and mapper_kind(data[name]) != 'mlp':
            raise click.ClickException(f'{name} in {path} has no mapping network; pass a StyleGAN2-ADA or StyleGAN3 generator pickle.')


def check_output_path(out: str, inputs) -> None:
    """Refuse to write over an input pickle."""
    for path in inputs:
        if os.path.abspath(out) == os.path.abspath(path) or (os.path.exists(out) and os.path.samefile(out, path)):
            raise click.ClickException(f'--out {out} is the input pickle; give another path (the input is never overwritten).')

#----------------------------------------------------------------------------
# Building the RTM generator.

def rtm_generator_kwargs(G_old, steps: int) -> Dict:
    """init_kwargs of the RTM Generator: the old ones, the MLP depth replaced by the RTM's options."""
    kwargs = copy.deepcopy(dict(G_old.init_kwargs))
    mapping_kwargs = dict(kwargs.get('mapping_kwargs') or {})
    mapping_kwargs.pop('num_layers', None)
    mapping_kwargs.update(adapters.rtm_kwargs(steps=steps))   # H = steps, the rest core.DEFAULTS, as train.py --map=rtm writes them
    kwargs['mapping_kwargs'] = mapping_kwargs
    return kwargs


def build_rtm_generator(G_old, steps: int, seed: int = 0):
    """A new RTM generator of G_old's family (adapters.RTM_GENERATORS) with every tensor of G_old but the
    MLP layers copied; the RTM is initialised from `seed` (the global RNG is left as it was)."""
    import dnnlib
    from torch_utils import misc
    class_name = adapters.RTM_GENERATORS[official_generator(G_old)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G = dnnlib.util.construct_class_by_name(class_name=class_name, **rtm_generator_kwargs(G_old, steps)).eval().requires_grad_(False)
    old = {name for name, _ in misc.named_params_and_buffers(G_old)}
    new = {name for name, _ in misc.named_params_and_buffers(G)}
    skipped = sorted(n for n in old - new if not n.startswith('mapping.fc'))
    if skipped:
        raise click.ClickException(f'the generator has tensors that the RTM generator lacks ({", ".join(skipped[:4])}), '
                                   f'which a swap would lose; swap supports the stock generators ({", ".join(adapters.RTM_GENERATORS)}) '
                                   f'only: pass a pickle that train.py wrote with the stock networks.')
    with torch.no_grad():
        misc.copy_params_and_buffers(G_old, G, require_all=False)
    return G

#----------------------------------------------------------------------------
# Evaluation on fixed seeds.

def seed_inputs(G, num_seeds: int):
    """z for seeds 0..num_seeds-1 as generate.py draws them; class seed % c_dim for a conditional model."""
    z = torch.from_numpy(np.stack([np.random.RandomState(seed).randn(G.z_dim) for seed in range(num_seeds)])).float()
    c = torch.zeros([num_seeds, G.c_dim])
    if G.c_dim > 0:
        c[torch.arange(num_seeds), torch.arange(num_seeds) % G.c_dim] = 1
    return z, c


def to_uint8_range(img: torch.Tensor) -> torch.Tensor:
    """generate.py's conversion to [0, 255], without the rounding."""
    return (img * 127.5 + 128).clamp(0, 255)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two [N, C, H, W] batches in [0, 255]."""
    mse = (a - b).square().flatten(1).mean(dim=1).clamp(min=1e-10)
    return 10 * torch.log10(255 ** 2 / mse)


class Evaluator:
    """Relative w error and image PSNR of a student mapper against the teacher's, on fixed seeds.

    Relative w error (centered): distill.relative_error over all seeds (1 = no better than predicting the
    mean w). Uncentered: ||w_student - w_teacher|| / ||w_teacher||, smaller by the share of the mean w in
    ||w_teacher||."""

    def __init__(self, G_teacher, num_seeds: int, batch: int = 16):
        self.G = G_teacher
        self.batch = batch
        self.z, self.c = seed_inputs(G_teacher, num_seeds)
        with torch.no_grad():
            self.w = G_teacher.mapping(self.z, self.c)[:, 0]
            self.images = self.synthesize(self.w)

    def synthesize(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ws = w.unsqueeze(1).repeat([1, self.G.num_ws, 1])
            return torch.cat([to_uint8_range(self.G.synthesis(ws[i:i + self.batch], noise_mode='const'))
                              for i in range(0, len(ws), self.batch)])

    def w_error(self, w: torch.Tensor) -> float:
        return distill.relative_error(w, self.w)

    def figures(self, w: torch.Tensor, images: bool = True) -> Dict:
        out = dict(rel_w_error=self.w_error(w), rel_w_error_uncentered=(w - self.w).norm().item() / self.w.norm().item())
        if images:
            p = psnr(self.synthesize(w), self.images)
            out.update(psnr_median=p.median().item(), psnr_min=p.min().item())
        return out

    def student_w(self, mapping) -> torch.Tensor:
        with torch.no_grad():
            return mapping.rtm(mapping.mapper_input(self.z, self.c))

    def floor_figures(self, mapping, seed: int = 0, images: bool = True) -> Dict:
        """figures() of the linear least-squares floor from the RTM mapping's input to the teacher's w,
        fitted on a stream seeded apart from distill(mapping, ..., seed=seed)'s."""
        sampler = distill.Sampler(self.G.z_dim, self.G.c_dim, seed + 1)
        floor = distill.linear_floor(sampler, lambda z, c: self.G.mapping(z, c)[:, 0], mapping, samples=max(8192, 8 * self.G.z_dim))
        return self.figures(distill.affine(floor, mapping.mapper_input(self.z, self.c)), images=images)


def save_grid(rows, path: str) -> None:
    """PNG grid: one row per [N, C, H, W] batch in [0, 255], images side by side."""
    import PIL.Image
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)     # [C, rows*H, N*W]
    array = grid.round().to(torch.uint8).permute(1, 2, 0).numpy()
    PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, 'L' if array.shape[2] == 1 else 'RGB').save(path)

#----------------------------------------------------------------------------

def _default_grid(out: str) -> str:
    return os.path.splitext(out)[0] + '-grid.png'


@click.command()
@click.option('network_pkl', '--network', type=click.Path(exists=True, dir_okay=False), required=True, metavar='PKL',
              help='Pretrained StyleGAN2-ADA or StyleGAN3 pickle (MLP mapper).')
@click.option('--out', type=click.Path(dir_okay=False), required=True, metavar='PKL', help='Output pickle (never the input).')
@click.option('--map-h', type=click.IntRange(min=1), default=core.DEFAULTS['steps'], show_default=True, metavar='INT',
              help='RTM refinement steps H stored in the pickle (set-h changes it later).')
@click.option('--distill-kimg', type=click.FloatRange(min=0), default=distill.DEFAULTS['kimg'], show_default=True, metavar='KIMG',
              help='Thousands of (z, c) samples to distil on; 0 = least-squares initialisation only.')
@click.option('--seed', type=click.IntRange(min=0), default=0, show_default=True, help='Seed of the RTM initialisation and of the distillation samples.')
@click.option('--eval-seeds', type=click.IntRange(min=1), default=64, show_default=True, metavar='INT',
              help='Seeds 0..N-1 (generate.py draws) for the report and the grid.')
@click.option('--grid', type=click.Path(dir_okay=False), default=None, metavar='PNG',
              help='Image grid, originals above swapped (first 16 seeds) [default: OUT without .pkl + -grid.png].')
@checkout.option
def swap(network_pkl: str, out: str, map_h: int, distill_kimg: float, seed: int, eval_seeds: int, grid: Optional[str], stylegan: Optional[str]):
    """Replace the MLP mapper of G and G_ema in a pretrained pickle with an RTM distilled onto it.

    \b
    Example:
      rtm-mapping swap --network=network-snapshot.pkl --out=rtm.pkl
      python train.py --resume=rtm.pkl ...          # fine-tune with the RTM mapper
    """
    checkout.use(stylegan)
    grid = grid or _default_grid(out)
    check_output_path(out, [network_pkl])
    check_output_path(grid, [network_pkl])
    data = load_pickle(network_pkl)
    check_mlp_mappers(data, network_pkl)
    torch.set_grad_enabled(True)
    start = time.time()

    evaluator = Evaluator(data['G_ema'], eval_seeds)
    result = dict(data, **rtm_generators(data, map_h, distill_kimg, seed))
    G_ema = result['G_ema']
    figures, floor_figures = evaluator.figures(evaluator.student_w(G_ema.mapping)), evaluator.floor_figures(G_ema.mapping, seed)
    elapsed = time.time() - start
    with open(out, 'wb') as f:
        pickle.dump(result, f)
    n = min(16, eval_seeds)
    save_grid([evaluator.images[:n], evaluator.synthesize(evaluator.student_w(G_ema.mapping)[:n])], grid)

    report = dict(network=network_pkl, out=out, grid=grid, map_h=map_h, distill_kimg=distill_kimg, seed=seed, eval_seeds=eval_seeds,
                  seconds=round(elapsed, 1), swapped=figures, linear_floor=floor_figures)
    click.echo(summary(report))
    click.echo(json.dumps(report))
    click.echo(f'Wrote {out} and {grid} in {elapsed:.0f} s.')


def rtm_generators(data: Dict, steps: int, kimg: float, seed: int) -> Dict:
    """G_ema, and G where the pickle has one, with an RTM mapper distilled onto G_ema's MLP mapper
    (G gets the same RTM, with its own synthesis network, w_avg and embedding)."""
    teacher = data['G_ema'].mapping
    G_ema = build_rtm_generator(data['G_ema'], steps, seed)
    total = distill.adam_steps(kimg, distill.DEFAULTS['batch'])
    with click.progressbar(length=total, label=f'Distilling {kimg:g} kimg', show_eta=True, show_pos=True) as bar:
        distill.distill(G_ema.mapping, lambda z, c: teacher(z, c)[:, 0], kimg=kimg, seed=seed,
                        teacher_layer=distill.first_layer(teacher), progress=lambda step, steps, loss: bar.update(1))
    generators = dict(G_ema=G_ema)
    if 'G' in data:
        G = build_rtm_generator(data['G'], steps, seed)
        with torch.no_grad():
            for dst, src in zip(G.mapping.rtm.parameters(), G_ema.mapping.rtm.parameters()):
                dst.copy_(src)
        generators['G'] = G
    return generators


def summary(report: Dict) -> str:
    """The swap's figures in one sentence."""
    figures, floor = report['swapped'], report['linear_floor']
    return (f'On seeds 0..{report["eval_seeds"] - 1}: relative w error {figures["rel_w_error"]:.4f} centered, '
            f'{figures["rel_w_error_uncentered"]:.4f} uncentered (linear least-squares floor {floor["rel_w_error"]:.4f}, '
            f'{floor["rel_w_error_uncentered"]:.4f}), median PSNR {figures["psnr_median"]:.2f} dB '
            f'(floor {floor["psnr_median"]:.2f} dB), worst {figures["psnr_min"]:.2f} dB.')

#----------------------------------------------------------------------------

def describe(data: Dict) -> Dict:
    """Facts about each network of a pickle: mapper kind, RTM options, parameter count, w_avg."""
    facts = {}
    for name, value in data.items():
        if not isinstance(value, torch.nn.Module):
            facts[name] = dict(type=type(value).__name__) if value is not None else None
            continue
        entry = dict(cls=type(value).__name__, params=sum(p.numel() for p in value.parameters()))
        mapping = getattr(value, 'mapping', None)
        if name.startswith('G') and mapping is not None:
            entry['mapper'] = mapper_kind(value)
            entry['mapper_params'] = sum(p.numel() for p in mapping.parameters())
            if entry['mapper'] == 'rtm':
                rtm = mapping.rtm
                entry.update(H=rtm.steps, L=rtm.inner_steps, block=rtm.block_name, tokens=rtm.tokens, token_dim=rtm.token_dim,
                             grad_steps=rtm.grad_steps, stored_H=(value.init_kwargs.get('mapping_kwargs') or {}).get('steps'))
            else:
                entry['layers'] = getattr(mapping, 'num_layers', None)
            w_avg = getattr(mapping, 'w_avg', None)
            entry['w_avg_finite'] = None if w_avg is None else bool(torch.isfinite(w_avg).all())
        facts[name] = entry
    return facts


@click.command()
@click.argument('network_pkl', type=click.Path(exists=True, dir_okay=False), metavar='PKL')
@click.option('--json', 'as_json', is_flag=True, help='Print the facts as JSON.')
@checkout.option
def info(network_pkl: str, as_json: bool, stylegan: Optional[str]):
    """Describe the networks of a pickle: mapper kind, H, L, block, parameters, w_avg."""
    checkout.use(stylegan)
    facts = describe(load_pickle(network_pkl))
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for name, entry in facts.items():
        if entry is None or 'cls' not in entry:
            click.echo(f'{name}: {"None" if entry is None else entry["type"]}')
            continue
        line = f'{name}: {entry["cls"]}, {entry["params"]:,} parameters'
        if 'mapper' in entry:
            if entry['mapper'] == 'rtm':
                line += (f'; mapper rtm (H={entry["H"]}, L={entry["L"]}, block={entry["block"]}, '
                         f'{entry["tokens"]}x{entry["token_dim"]} tokens, {entry["mapper_params"]:,} parameters)')
            else:
                line += f'; mapper {entry["mapper"]} ({entry["layers"]} layers, {entry["mapper_params"]:,} parameters)'
            line += f'; w_avg finite: {entry["w_avg_finite"]}'
        click.echo(line)

#----------------------------------------------------------------------------

def store_steps(G, steps: int) -> None:
    """Set the inference H of an RTM generator, in the live RTM and in the init_kwargs that
    legacy.load_network_pkl(force_fp16=True) rebuilds it from."""
    G.mapping.rtm.set_steps(steps=steps)
    mapping_kwargs = dict(G._init_kwargs.get('mapping_kwargs') or {})
    mapping_kwargs['steps'] = steps
    G._init_kwargs['mapping_kwargs'] = mapping_kwargs
    if 'steps' in getattr(G.mapping, '_init_kwargs', {}):
        G.mapping._init_kwargs['steps'] = steps


@click.command()
@click.argument('network_pkl', type=click.Path(exists=True, dir_okay=False), metavar='PKL')
@click.option('--h', 'steps', type=click.IntRange(min=1), required=True, metavar='INT', help='Inference refinement steps H.')
@click.option('--out', type=click.Path(dir_okay=False), required=True, metavar='PKL', help='Output pickle (never the input).')
@checkout.option
def set_h(network_pkl: str, steps: int, out: str, stylegan: Optional[str]):
    """Store another inference H in an RTM pickle, for generate.py and calc_metrics.py to use unchanged."""
    checkout.use(stylegan)
    check_output_path(out, [network_pkl])
    data = load_pickle(network_pkl)
    names = [name for name in ('G', 'G_ema') if name in data]
    if any(mapper_kind(data[name]) != 'rtm' for name in names):
        raise click.ClickException(f'{network_pkl} has an MLP mapper; run `rtm-mapping swap` first, then set-h on its output.')
    for name in names:
        store_steps(data[name], steps)
    with open(out, 'wb') as f:
        pickle.dump(data, f)
    click.echo(f'Wrote {out} with H = {steps} (was trained or distilled at another H: quality may differ; see sweep-h).')

#----------------------------------------------------------------------------
