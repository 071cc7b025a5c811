"""The feature networks ("detectors") of the official StyleGAN2-ADA metrics, and how to use them offline.

The official metrics load each detector with `dnnlib.util.open_url(url)`, which first looks in its
download cache, `dnnlib.make_cache_dir_path('downloads')` ($DNNLIB_CACHE_DIR/downloads, else
~/.cache/dnnlib/downloads), for exactly one file named `<md5(url)>_*`, and downloads from NVIDIA's
CDN only when there is none. `install()` puts a local copy there under that name, so that the
official code finds it without a network and without any change to its files:

    rtm-mapping detectors install inception /path/to/inception-2015-12-05.pt
    rtm-mapping detectors install vgg16 /path/to/vgg16.pt

`standin()` builds a tiny TorchScript network with the official call signatures. It is a test tool:
its features are a fixed random projection of downsampled pixels, and metrics computed with it
mean nothing.
"""

import hashlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Dict, Iterable, List, Optional

import click
import torch
import torch.nn.functional as F

# name: URL the official metrics load it from.
DETECTORS = {
    'inception': 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt',
    'vgg16':     'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt',
}

# Official metric: detectors it loads (metrics/metric_main.py of NVlabs/stylegan2-ada-pytorch).
OFFICIAL_METRICS = {
    'fid50k_full': ('inception',), 'kid50k_full': ('inception',), 'pr50k3_full': ('vgg16',),
    'ppl2_wend':   ('vgg16',),     'is50k':       ('inception',), 'fid50k':      ('inception',),
    'kid50k':      ('inception',), 'pr50k3':      ('vgg16',),     'ppl_zfull':   ('vgg16',),
    'ppl_wfull':   ('vgg16',),     'ppl_zend':    ('vgg16',),     'ppl_wend':    ('vgg16',),
}

#----------------------------------------------------------------------------

def cache_dir() -> str:
    """The folder dnnlib.util.open_url caches downloads in (dnnlib's own answer when dnnlib is loaded)."""
    dnnlib = sys.modules.get('dnnlib')
    if dnnlib is not None and hasattr(dnnlib, 'make_cache_dir_path'):
        return dnnlib.make_cache_dir_path('downloads')
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], 'downloads')
    for home in ('HOME', 'USERPROFILE'):
        if home in os.environ:
            return os.path.join(os.environ[home], '.cache', 'dnnlib', 'downloads')
    return os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib', 'downloads')


def url_of(name_or_url: str) -> str:
    """The URL of a detector given by name ('inception', 'vgg16') or by URL."""
    if name_or_url in DETECTORS:
        return DETECTORS[name_or_url]
    if '://' in name_or_url:
        return name_or_url
    raise ValueError(f'unknown detector {name_or_url!r}: use one of {", ".join(DETECTORS)} or a URL')


def _url_md5(url: str) -> str:
    return hashlib.md5(url.encode('utf-8')).hexdigest()


def cached_files(name_or_url: str) -> List[str]:
    """Files in the cache that open_url would take for this detector (it uses one only if there is exactly one)."""
    folder = cache_dir()
    prefix = _url_md5(url_of(name_or_url)) + '_'
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(prefix))


def _same_bytes(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, 'rb') as fa, open(b, 'rb') as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True


def install(name_or_url: str, local_file: str) -> str:
    """Copy a local TorchScript detector into dnnlib's download cache, under the name open_url looks for.

    An existing different cached copy is moved aside to `backup-<time>-<its name>` in the same folder
    (a name open_url ignores), never overwritten.

    Args:
        name_or_url: 'inception', 'vgg16' or the URL the metric code loads.
        local_file: The TorchScript file (e.g. inception-2015-12-05.pt downloaded on another machine).
    Returns:
        The path of the cached copy.
    """
    url = url_of(name_or_url)
    if not os.path.isfile(local_file):
        raise FileNotFoundError(f'{local_file} is not a file')
    try:
        torch.jit.load(local_file, map_location='cpu')
    except Exception as e:
        raise ValueError(f'{local_file} is not a TorchScript file ({type(e).__name__}); '
                         f'the metrics need the .pt file served at {url}') from e
    existing = cached_files(url)
    if len(existing) == 1 and _same_bytes(existing[0], local_file):
        return existing[0]
    folder = cache_dir()
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for old in existing:
        os.replace(old, os.path.join(folder, f'backup-{stamp}-{os.path.basename(old)}'))
    target = os.path.join(folder, f'{_url_md5(url)}_{url.split("/")[-1]}')
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f'tmp-{os.getpid()}-{os.path.basename(target)}')
    shutil.copyfile(local_file, temp)
    os.replace(temp, target)
    return target


def needed(metrics: Iterable[str]) -> List[str]:
    """Detectors (names of DETECTORS) that a list of metric names loads: official ones and rtm_mapping.metrics'.
    Metrics neither knows are left out."""
    from rtm_mapping.metrics import METRICS
    names = []
    for metric in metrics:
        if metric in OFFICIAL_METRICS:
            names.extend(OFFICIAL_METRICS[metric])
        elif metric in METRICS:
            names.append(METRICS[metric].detector)
    return sorted(set(names))


def missing(metrics: Iterable[str]) -> List[str]:
    """Detectors that the metrics need and that open_url would download (none, or more than one, cached copy)."""
    return [name for name in needed(metrics) if len(cached_files(name)) != 1]


def offline_help(names: Iterable[str]) -> str:
    """What to tell a user whose metrics could not download their detectors."""
    names = list(names)
    lines = [f'The metrics need feature networks that are not in the cache ({cache_dir()}) '
             f'and could not be downloaded: {", ".join(names)}.',
             'Download them on a machine with network access:']
    lines += [f'    {DETECTORS[name]}' for name in names]
    lines += ['then install each copy here (set DNNLIB_CACHE_DIR first if you use it):']
    lines += [f'    rtm-mapping detectors install {name} /path/to/{DETECTORS[name].split("/")[-1]}' for name in names]
    return '\n'.join(lines)

#----------------------------------------------------------------------------
# Stand-in detector, for tests only.

class StandInDetector(torch.nn.Module):
    """A tiny fixed network with the call signatures of NVIDIA's inception-2015-12-05.pt and vgg16.pt.

    detector(images, return_features=True) -> [N, num_features] features (Inception: FID, KID; VGG16: P/R).
    detector(images, no_output_bias=True)  -> [N, num_classes] probabilities (Inception: IS).
    detector(images, resize_images=False, return_lpips=True) -> [N, num_features] unit-norm features (VGG16: PPL).
    `images` are uint8 or float in [0, 255], NCHW with 3 channels, any resolution.
    """

    def __init__(self, num_features: int, num_classes: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer('features', torch.randn([3 * 4 * 4, num_features], generator=generator) / 48 ** 0.5)
        self.register_buffer('classes', torch.randn([num_features, num_classes], generator=generator) / num_features ** 0.5)

    def forward(self, images: torch.Tensor, return_features: bool = False, no_output_bias: bool = False,
                resize_images: bool = True, return_lpips: bool = False) -> torch.Tensor:
        x = images.to(torch.float32) / 127.5 - 1
        x = F.adaptive_avg_pool2d(x, [4, 4]).flatten(1)
        features = F.relu(x @ self.features)
        if return_lpips:
            return features / features.square().sum(dim=1, keepdim=True).sqrt().clamp(min=1e-8)
        if return_features:
            return features
        return torch.softmax(features @ self.classes, dim=1)


def standin(name: str, path: str, num_features: Optional[int] = None) -> str:
    """Write a TorchScript stand-in for detector `name` to `path` (a test tool; see StandInDetector).

    Args:
        name: 'inception' (2048 features, 1008 classes) or 'vgg16' (4096 features).
        path: Output .pt file.
        num_features: Override the feature width, e.g. a small one to keep FID's matrix square root fast in tests.
    Returns:
        path.
    """
    shapes: Dict[str, tuple] = dict(inception=(2048, 1008), vgg16=(4096, 1))
    if name not in shapes:
        raise ValueError(f'unknown detector {name!r}: use one of {", ".join(shapes)}')
    features, classes = shapes[name]
    module = StandInDetector(num_features or features, classes, seed=sorted(shapes).index(name))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)     # torch >= 2.10 deprecates TorchScript, the official detectors' format.
        torch.jit.save(torch.jit.script(module.eval()), path)
    return path

#----------------------------------------------------------------------------
# Command line: `rtm-mapping detectors ...`.

@click.group()
def detectors():
    """Install or list the feature networks the metrics use (for machines without network access)."""


@detectors.command(name='install')
@click.argument('name', type=click.Choice(sorted(DETECTORS)))
@click.argument('local_file', type=click.Path(exists=True, dir_okay=False))
def install_command(name: str, local_file: str):
    """Copy LOCAL_FILE into dnnlib's download cache as detector NAME.

    \b
    Example, with a copy downloaded elsewhere:
        rtm-mapping detectors install inception ~/inception-2015-12-05.pt
    """
    try:
        target = install(name, local_file)
    except ValueError as e:
        raise click.ClickException(f'{e}. Pass the file downloaded from {DETECTORS[name]}.') from e
    click.echo(f'Installed {name}: {target}')


@detectors.command(name='list')
def list_command():
    """Show each detector's URL and whether the metrics will find it in the cache."""
    click.echo(f'Cache: {cache_dir()}')
    for name, url in DETECTORS.items():
        files = cached_files(name)
        state = 'cached' if len(files) == 1 else 'not cached' if not files else f'{len(files)} copies cached: open_url ignores them all'
        click.echo(f'{name:<10s} {state:<12s} {url}')

#----------------------------------------------------------------------------
