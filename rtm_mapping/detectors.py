"""The feature networks ("detectors") of the official StyleGAN2-ADA and StyleGAN3 metrics, and how to use them offline.

The official metrics load each detector with `dnnlib.util.open_url(url)`, which first looks in its
download cache, `dnnlib.make_cache_dir_path('downloads')` ($DNNLIB_CACHE_DIR/downloads, else
~/.cache/dnnlib/downloads), for exactly one file named `<md5(url)>_*`, and downloads from NVIDIA
only when there is none. `install()` puts a local copy there under that name, so that the official
code finds it without a network and without any change to its files:

    rtm-mapping detectors install inception /path/to/inception-2015-12-05.pt    # StyleGAN2-ADA's
    rtm-mapping detectors install inception /path/to/inception-2015-12-05.pkl   # StyleGAN3's

The two codebases load the same networks from different URLs and formats: StyleGAN2-ADA TorchScript
files (`torch.jit.load`), StyleGAN3 pickles (`pickle.load`); `install()` tells them apart by content.

`standin()` builds a tiny network with the official call signatures. It is a test tool: its
features are a fixed random projection of downsampled pixels, and metrics computed with it mean
nothing. Which metric needs which detector is rtm_mapping.metrics' business, not this module's.
"""

import hashlib
import os
import pickle
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from typing import Dict, Iterable, List, Optional

import click
import torch
import torch.nn.functional as F

# codebase (stylegan2_ada_patch.checkout.CODEBASES): {detector: URL its official metrics load it from}.
DETECTORS = {
    'stylegan2-ada': {
        'inception': 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt',
        'vgg16':     'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt',
    },
    'stylegan3': {
        'inception': 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl',
        'vgg16':     'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/vgg16.pkl',
    },
}
NAMES = ('inception', 'vgg16')
FORMATS = {'stylegan2-ada': 'TorchScript', 'stylegan3': 'pickle'}   # how each codebase's metrics load a detector

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


def url_of(name_or_url: str, codebase: str = 'stylegan2-ada') -> str:
    """The URL of a detector given by name ('inception', 'vgg16') as a codebase's metrics load it, or by URL."""
    if name_or_url in NAMES:
        return DETECTORS[codebase][name_or_url]
    if '://' in name_or_url:
        return name_or_url
    raise ValueError(f'unknown detector {name_or_url!r}: use one of {", ".join(NAMES)} or a URL')


def _url_md5(url: str) -> str:
    return hashlib.md5(url.encode('utf-8')).hexdigest()


def cached_files(name_or_url: str, codebase: str = 'stylegan2-ada') -> List[str]:
    """Files in the cache that open_url would take for this detector (it uses one only if there is exactly one)."""
    folder = cache_dir()
    prefix = _url_md5(url_of(name_or_url, codebase)) + '_'
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


def file_codebase(local_file: str) -> str:
    """The codebase whose metrics load a detector file like this one: a TorchScript archive (a zip) is
    StyleGAN2-ADA's format, a pickle StyleGAN3's. Raises ValueError for anything else."""
    with open(local_file, 'rb') as f:
        head = f.read(2)
    if zipfile.is_zipfile(local_file):
        try:
            torch.jit.load(local_file, map_location='cpu')
            return 'stylegan2-ada'
        except Exception as e:
            raise ValueError(f'{local_file} is a zip but not a TorchScript file ({type(e).__name__})') from e
    if head[:1] == pickle.PROTO:
        return 'stylegan3'
    raise ValueError(f'{local_file} is not a TorchScript file (StyleGAN2-ADA\'s .pt) nor a pickle (StyleGAN3\'s .pkl)')


def install(name_or_url: str, local_file: str) -> str:
    """Copy a local detector into dnnlib's download cache, under the name open_url looks for.

    A TorchScript file goes where StyleGAN2-ADA's metrics look for it, a pickle where StyleGAN3's do.
    An existing different cached copy is moved aside to `backup-<time>-<its name>` in the same folder
    (a name open_url ignores), never overwritten.

    Args:
        name_or_url: 'inception', 'vgg16' or the URL the metric code loads.
        local_file: The detector file (e.g. inception-2015-12-05.pt or .pkl downloaded on another machine).
    Returns:
        The path of the cached copy.
    """
    if not os.path.isfile(local_file):
        raise FileNotFoundError(f'{local_file} is not a file')
    url = url_of(name_or_url, file_codebase(local_file))
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


def missing(names: Iterable[str], codebase: str = 'stylegan2-ada') -> List[str]:
    """Detectors (of NAMES) that a codebase's open_url would download: none, or more than one, cached copy."""
    return [name for name in names if len(cached_files(name, codebase)) != 1]


def offline_help(names: Iterable[str], codebase: str = 'stylegan2-ada') -> str:
    """What to tell a user whose metrics could not download their detectors."""
    names = list(names)
    urls = {name: DETECTORS[codebase][name] for name in names}
    lines = [f'The metrics need feature networks that are not in the cache ({cache_dir()}) '
             f'and could not be downloaded: {", ".join(names)}.',
             'Download them on a machine with network access:']
    lines += [f'    {url}' for url in urls.values()]
    lines += ['then install each copy here (set DNNLIB_CACHE_DIR first if you use it):']
    lines += [f'    rtm-mapping detectors install {name} /path/to/{url.split("/")[-1]}' for name, url in urls.items()]
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
    """Write a stand-in for detector `name` to `path` (a test tool; see StandInDetector): TorchScript, as
    StyleGAN2-ADA's metrics load it, or, for a path ending in .pkl, a pickle, as StyleGAN3's do (it
    then needs rtm_mapping to load).

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
    if path.endswith('.pkl'):
        with open(path, 'wb') as f:
            pickle.dump(module.eval(), f)
        return path
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
@click.argument('name', type=click.Choice(NAMES))
@click.argument('local_file', type=click.Path(exists=True, dir_okay=False))
def install_command(name: str, local_file: str):
    """Copy LOCAL_FILE into dnnlib's download cache as detector NAME (a .pt file for StyleGAN2-ADA's
    metrics, a .pkl file for StyleGAN3's).

    \b
    Example, with a copy downloaded elsewhere:
        rtm-mapping detectors install inception ~/inception-2015-12-05.pt
    """
    try:
        target = install(name, local_file)
    except ValueError as e:
        urls = ' or '.join(DETECTORS[codebase][name] for codebase in DETECTORS)
        raise click.ClickException(f'{e}. Pass the file downloaded from {urls}.') from e
    click.echo(f'Installed {name}: {target}')


@detectors.command(name='list')
def list_command():
    """Show each detector's URL and whether the metrics will find it in the cache."""
    click.echo(f'Cache: {cache_dir()}')
    for codebase, urls in DETECTORS.items():
        for name, url in urls.items():
            files = cached_files(name, codebase)
            state = 'cached' if len(files) == 1 else 'not cached' if not files else f'{len(files)} copies cached: open_url ignores them all'
            click.echo(f'{name:<10s} {state:<12s} {url}')

#----------------------------------------------------------------------------
