"""`rtm-mapping imle generate`: images of an RS-IMLE snapshot for given seeds, at any H and L (paper §4.4).

Seeds as StyleGAN's generate.py reads them ('0-63', '1,5,10-12'), one PNG per seed and one grid of all.
What a seed gives is fixed here, for every tool of this package that generates (generate, metrics, sweep-h):

    z      = np.random.RandomState(seed).randn(z_dim)      as StyleGAN's generate.py: the same z for the same seed
    noise  = the decoder's noise injection draws from torch.Generator().manual_seed(seed), on the CPU, so that
             the image depends on the seed alone, not on the device (CPU or CUDA) it is generated on
    image  = G_ema(z, steps=H, inner_steps=L), uint8 as NVIDIA's tools write it: clamp(x * 127.5 + 128, 0, 255)

`generate` makes one image per call (batch 1), so seed s gives the same image alone or among other seeds;
`batches` makes many at a time for the metrics, and equals `generate` at batch size 1 (with a larger batch the
noise of the batch starting at seed s is drawn from seed s's generator, as one tensor).
"""

import os
import re
from typing import Iterator, List, Optional, Sequence

import click
import numpy as np
import PIL.Image
import torch

from rtm_mapping.imle import snapshot

#----------------------------------------------------------------------------

def parse_seeds(text: str) -> List[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]: comma-separated non-negative integers and inclusive ranges a-b (StyleGAN's num_range)."""
    seeds = []
    for part in text.split(','):
        part = part.strip()
        match = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
        if not match or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise click.BadParameter(f'{text!r}: give seeds as comma-separated integers and ranges, e.g. 0-63 or 1,5,10-12', param_hint='--seeds')
        lo = int(match.group(1))
        hi = lo if match.group(2) is None else int(match.group(2))
        seeds.extend(range(lo, hi + 1))
    if seeds and max(seeds) >= 2 ** 32:
        raise click.BadParameter(f'{text!r}: seeds must be below 2**32 (numpy RandomState seeds)', param_hint='--seeds')
    if len(set(seeds)) != len(seeds):
        raise click.BadParameter(f'{text!r} names a seed twice', param_hint='--seeds')
    return seeds


def seed_latents(seeds: Sequence[int], z_dim: int) -> torch.Tensor:
    """float32 [len(seeds), z_dim]: z of each seed, np.random.RandomState(seed).randn(z_dim) (StyleGAN's generate.py)."""
    return torch.from_numpy(np.stack([np.random.RandomState(seed).randn(z_dim) for seed in seeds]).astype(np.float32)).reshape(-1, z_dim)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 [0, 255], as NVIDIA's generate.py and metrics convert it."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def check_steps(G, steps: Optional[int], inner_steps: Optional[int], what: str = '--map-h/--map-l') -> None:
    """A clear error when H or L is given for a generator whose mapper has none (the MLP)."""
    if (steps is not None or inner_steps is not None) and G.mapper != 'rtm':
        raise click.ClickException(f'{what} set the RTM\'s refinement steps H and inner cycles L; this generator has the '
                                   f'{G.mapper!r} mapper ({G.mapping.num_layers} layers), whose depth is fixed. Leave them out.')


@torch.no_grad()
def batches(G, seeds: Sequence[int], *, device, batch_size: int, steps: Optional[int] = None,
            inner_steps: Optional[int] = None) -> Iterator[torch.Tensor]:
    """uint8 images [b, 3, R, R] on `device`, for consecutive batches of `seeds` (see the module docstring).

    Args:
        G: A generator in eval mode (snapshot.load_generator), on `device`.
        seeds: One image per seed, in this order.
        device: Where G runs.
        batch_size: Images per forward pass.
        steps, inner_steps: The RTM's H and L for these images (None = as trained).
    """
    device = torch.device(device)
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        z = seed_latents(chunk, G.z_dim).to(device)
        noise = torch.Generator().manual_seed(int(chunk[0]))
        yield to_uint8(G(z, steps=steps, inner_steps=inner_steps, generator=noise))


def generate(G, seeds: Sequence[int], *, device, steps: Optional[int] = None, inner_steps: Optional[int] = None) -> torch.Tensor:
    """uint8 [len(seeds), 3, R, R] on the CPU: each seed's image, made alone (batch 1)."""
    return torch.cat([images.cpu() for images in batches(G, seeds, device=device, batch_size=1, steps=steps, inner_steps=inner_steps)])


def image_grid(images: torch.Tensor, columns: Optional[int] = None) -> np.ndarray:
    """uint8 [N, C, R, R] -> one uint8 [rows * R, columns * R, C] array, row by row; columns default to ceil(sqrt(N))."""
    n, c, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    grid = torch.zeros([rows * columns, c, h, w], dtype=torch.uint8)
    grid[:n] = images
    return grid.reshape(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c).numpy()


def save_png(array: np.ndarray, path: str) -> None:
    PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, 'L' if array.shape[2] == 1 else 'RGB').save(path)

#----------------------------------------------------------------------------

def _default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


@click.command()
@click.option('--snapshot', 'snapshot_path', help='RS-IMLE snapshot (snapshot-epoch-*.pt of `rtm-mapping imle train`)', required=True, metavar='PT')
@click.option('--seeds', 'seeds_text', help='Seeds, e.g. 0-63 or 1,5,10-12', default='0-15', show_default=True, metavar='LIST')
@click.option('--outdir', help='Where to write seedNNNN.png and grid.png', required=True, metavar='DIR')
@click.option('--map-h', 'steps', help='RTM refinement steps H at inference  [default: as trained]', type=click.IntRange(min=1))
@click.option('--map-l', 'inner_steps', help='RTM inner cycles L at inference  [default: as trained]', type=click.IntRange(min=1))
@click.option('--ema/--no-ema', help='The moving average of the weights (what the paper evaluates), or the trained weights', default=True, show_default=True)
@click.option('--grid/--no-grid', 'write_grid', help='Also write grid.png, all seeds in one image', default=True, show_default=True)
@click.option('--grid-cols', help='Columns of the grid  [default: ceil(sqrt(number of seeds))]', type=click.IntRange(min=1))
@click.option('--device', help='Where to run the generator', type=click.Choice(['cpu', 'cuda']), default=_default_device(), show_default=True)
def generate_command(snapshot_path: str, seeds_text: str, outdir: str, steps: Optional[int], inner_steps: Optional[int], ema: bool,
                     write_grid: bool, grid_cols: Optional[int], device: str):
    """Generate images of an RS-IMLE snapshot, one PNG per seed and a grid, at any H and L (RTM).

    \b
    z of a seed is np.random.RandomState(seed).randn(z_dim), as StyleGAN's generate.py; the decoder's noise
    is drawn from torch.Generator().manual_seed(seed): a seed gives the same image on every run and device.
    \b
    Examples:
      rtm-mapping imle generate --snapshot run/snapshot-epoch-010000.pt --seeds 0-63 --outdir out
      rtm-mapping imle generate --snapshot run/snapshot-epoch-010000.pt --seeds 0-63 --map-h 32 --outdir out-h32
    """
    seeds = parse_seeds(seeds_text)
    if device == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device cuda was given but torch sees no CUDA device; pass --device cpu.')
    G = snapshot.load_generator(snapshot_path, ema=ema, device=device)
    check_steps(G, steps, inner_steps)
    images = generate(G, seeds, device=device, steps=steps, inner_steps=inner_steps)
    os.makedirs(outdir, exist_ok=True)
    for seed, image in zip(seeds, images):
        save_png(image.permute(1, 2, 0).numpy(), os.path.join(outdir, f'seed{seed:04d}.png'))
    if write_grid:
        save_png(image_grid(images, grid_cols), os.path.join(outdir, 'grid.png'))
    what = f'H={steps or G.mapping.steps}, L={inner_steps or G.mapping.inner_steps}' if G.mapper == 'rtm' else f'MLP mapper, {G.mapping.num_layers} layers'
    click.echo(f'Wrote {len(seeds)} images{" and grid.png" if write_grid else ""} ({G.img_resolution}x{G.img_resolution}, '
               f'{"G_ema" if ema else "G"}, {what}) to {outdir}')

#----------------------------------------------------------------------------
