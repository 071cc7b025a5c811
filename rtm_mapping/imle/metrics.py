"""`rtm-mapping imle metrics`: an RS-IMLE snapshot against its training set, as the paper evaluates (§4).

    fid    FID (Heusel et al. 2017)
    prdc   Improved Precision and Recall (Kynkäänniemi et al. 2019) with k = 3, and Density and Coverage
           (Naeem et al. 2020) with the same k (rtm_mapping.metrics.prdc)
    is     Inception Score (Salimans et al. 2016), 10 splits, mean and standard deviation

All from one feature network, NVIDIA's Inception-v3 (inception-2015-12-05.pt, TorchScript) as StyleGAN2-ADA's
metrics use it: uint8 images in, pool features (return_features=True) for FID and PRDC, class probabilities
without the output bias (no_output_bias=True) for IS. The paper's sample counts are the defaults: 50,000
generated images for CIFAR-10, 30,000 for CelebA-HQ, 5,000 for the few-shot sets (PAPER_NUM_GEN, by decoder),
the whole training set as reference. Generated image i is that of seed `seed + i` (rtm_mapping.imle.generate).

IS costs one more Inception pass over the generated images (none over the training set); FID and PRDC
share theirs. The training set's features are computed once per dataset, resolution and detector, and cached
(like the official metrics' gan-metrics cache) in DNNLIB_CACHE_DIR/gan-metrics (~/.cache/dnnlib/gan-metrics),
keyed by the files' names, sizes and modification times and the detector's bytes.

Offline: `rtm-mapping detectors install inception FILE` puts NVIDIA's file where it is looked for.
"""

import hashlib
import json
import os
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import click
import torch

from rtm_mapping import detectors
from rtm_mapping import metrics as metric_math
from rtm_mapping.imle import dataset, generate, snapshot

METRICS = ('fid', 'prdc', 'is')
PAPER_NUM_GEN = {'cifar10': 50000, 'celebahq': 30000, 'fewshot': 5000}     # §4, "Evaluation"
PRDC_K = 3              # §4: the k = 3 Precision and Recall of Kynkäänniemi et al.
IS_SPLITS = 10          # as the official is50k
DETECTOR = 'inception'
DETECTOR_BATCH = 64     # images per Inception call
PRDC_BLOCK = 10000      # rows and columns of one PRDC distance block (float64: 800 MB)

#----------------------------------------------------------------------------
# The feature network.

def _download(url: str, path: str) -> None:
    """Fetch url into path; raises on any failure (offline machines)."""
    import requests
    with requests.get(url, stream=True, timeout=30) as response:
        response.raise_for_status()
        with open(path, 'wb') as f:
            for chunk in response.iter_content(1 << 20):
                f.write(chunk)


def detector_file(log: Optional[Callable[[str], None]] = print) -> str:
    """The cached inception-2015-12-05.pt, downloaded once into dnnlib's cache if it is not there.

    Raises:
        click.ClickException: not cached and not downloadable; says how to install it offline.
    """
    files = detectors.cached_files(DETECTOR)
    if len(files) == 1:
        return files[0]
    if not files:
        url = detectors.url_of(DETECTOR)
        temp = os.path.join(detectors.cache_dir(), f'tmp-{os.getpid()}-{url.split("/")[-1]}')
        try:
            os.makedirs(detectors.cache_dir(), exist_ok=True)
            if log is not None:
                log(f'Downloading {url} ...')
            _download(url, temp)
            return detectors.install(DETECTOR, temp)
        except Exception:   # requests' errors, OSError, a truncated download that install() refuses
            pass
        finally:
            if os.path.exists(temp):
                os.remove(temp)
    raise click.ClickException(detectors.offline_help([DETECTOR]))


def load_detector(path: str, device) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)     # torch >= 2.10 deprecates TorchScript, NVIDIA's format
        return torch.jit.load(path, map_location=device).eval()


def _file_md5(path: str) -> str:
    md5 = hashlib.md5()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            md5.update(chunk)
    return md5.hexdigest()


@torch.no_grad()
def image_features(detector, batches: Iterable[torch.Tensor], *, device, probabilities: bool = False,
                   progress: Optional[Callable[[int], None]] = None) -> Dict[str, torch.Tensor]:
    """Inception outputs of uint8 [b, 3, R, R] image batches: {'features': float32 [N, 2048]} and, with
    `probabilities`, {'probs': float64 [N, 1008]} (for IS), on the CPU."""
    features, probs = [], []
    for images in batches:
        for part in images.split(DETECTOR_BATCH):
            part = part.to(device)
            features.append(detector(part, return_features=True).to(torch.float32).cpu())
            if probabilities:
                probs.append(detector(part, no_output_bias=True).to(torch.float64).cpu())
            if progress is not None:
                progress(part.shape[0])
    out = dict(features=torch.cat(features))
    if probabilities:
        out['probs'] = torch.cat(probs)
    return out

#----------------------------------------------------------------------------
# The training set's features, cached.

def _data_key(path: str, resolution: int, max_images: Optional[int], detector_md5: str) -> str:
    """What the reference features depend on: the image files (names, sizes, times), their use, the detector."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        files = [(name, os.stat(os.path.join(path, name)).st_size, os.stat(os.path.join(path, name)).st_mtime_ns)
                 for name in dataset.image_files(path)]
    else:
        files = [(os.path.basename(path), os.stat(path).st_size, os.stat(path).st_mtime_ns)]
    key = dict(path=path, files=files, resolution=resolution, max_images=max_images, detector=detector_md5, what='features')
    return hashlib.md5(repr(sorted(key.items())).encode('utf-8')).hexdigest()


def cache_file(path: str, resolution: int, max_images: Optional[int], detector_md5: str) -> str:
    """Where the reference features of a dataset are cached: DNNLIB_CACHE_DIR/gan-metrics/, beside downloads/."""
    name = f'rtm-imle-{dataset.dataset_name(path)}-{resolution}px-{DETECTOR}-{_data_key(path, resolution, max_images, detector_md5)}.pt'
    return os.path.join(os.path.dirname(detectors.cache_dir()), 'gan-metrics', name)


def reference_features(path: str, *, resolution: int, max_images: Optional[int], detector, detector_md5: str, device,
                       cache: bool = True, log: Optional[Callable[[str], None]] = print) -> torch.Tensor:
    """float32 [N, 2048] Inception features of the training images (the first max_images; None = all), from the
    cache when there, else computed (images resized to `resolution` as training reads them) and cached."""
    file = cache_file(path, resolution, max_images, detector_md5) if cache else None
    if file is not None and os.path.isfile(file):
        try:
            return torch.load(file, map_location='cpu', weights_only=True)['features']
        except Exception:   # a damaged cache file is computed again, and replaced
            if log is not None:
                log(f'{file}: unreadable cache file; computing the reference features again.')
    images = dataset.load_images(path, resolution, max_images=max_images, log=log)
    if log is not None:
        log(f'Reference: {images.shape[0]} training images of {path}')
    features = image_features(detector, [images], device=device)['features']
    if file is not None:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        temp = f'{file}.tmp-{os.getpid()}'
        torch.save(dict(features=features, path=os.path.abspath(path), resolution=resolution, max_images=max_images,
                        detector_md5=detector_md5), temp)
        os.replace(temp, file)
    return features

#----------------------------------------------------------------------------
# The metrics, from features.

def inception_score(probs: torch.Tensor, splits: int = IS_SPLITS) -> Dict[str, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) in each of `splits` consecutive parts; their mean and standard deviation
    (population, as numpy's std), in float64."""
    if probs.shape[0] < splits:
        raise ValueError(f'the Inception Score needs at least {splits} images (one per split), got {probs.shape[0]}')
    p = probs.to(torch.float64)
    scores = []
    for i in range(splits):
        part = p[i * p.shape[0] // splits:(i + 1) * p.shape[0] // splits]
        kl = part * (part.log() - part.mean(dim=0, keepdim=True).log())
        scores.append(kl.sum(dim=1).mean().exp())
    scores = torch.stack(scores)
    return dict(is_mean=float(scores.mean()), is_std=float(scores.std(unbiased=False)))


def compute(real: Dict[str, torch.Tensor], fake: Dict[str, torch.Tensor], metrics: Sequence[str], *, device='cpu',
            k: int = PRDC_K) -> Dict[str, float]:
    """The metrics from Inception outputs: real {'features', optional 'mean', 'cov'}, fake {'features', 'probs' for IS}.

    Returns:
        fid; precision, recall, density, coverage (prdc); is_mean, is_std (is): Python floats.
    """
    results = {}
    if 'fid' in metrics:
        mu_real, sigma_real = (real['mean'], real['cov']) if 'mean' in real else metric_math.feature_statistics(real['features'].to(device))
        mu_fake, sigma_fake = metric_math.feature_statistics(fake['features'].to(device))
        results['fid'] = metric_math.frechet_distance(mu_fake, sigma_fake, mu_real, sigma_real)
    if 'prdc' in metrics:
        results.update(metric_math.prdc(real['features'].to(device), fake['features'].to(device), k=k,
                                        row_batch_size=PRDC_BLOCK, col_batch_size=PRDC_BLOCK))
    if 'is' in metrics:
        results.update(inception_score(fake['probs']))
    return results


def parse_metrics(text: str) -> List[str]:
    names = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if not names or unknown:
        raise click.BadParameter(f'{text!r}: give a comma-separated list of {", ".join(METRICS)}', param_hint='--metrics')
    return names

#----------------------------------------------------------------------------
# A generator against its training set.

class Evaluator:
    """The training set's features and the detector, loaded once; evaluate() then scores a generator (at any H).

    Args:
        data: The training images (folder or zip), as `rtm-mapping imle train --data` read them.
        resolution: The generator's output size (the images are resized to it as in training).
        max_images: The first N images only, as a run with --subset; None = all.
        device: Where the detector, the generator and the PRDC distances run.
        cache: Use and fill the reference feature cache.
        log: Where progress lines go; None = nowhere.
    """

    def __init__(self, data: str, *, resolution: int, max_images: Optional[int] = None, device='cpu', cache: bool = True,
                 log: Optional[Callable[[str], None]] = print):
        self.device = torch.device(device)
        self.log = log
        self.detector_path = detector_file(log)
        self.detector_md5 = _file_md5(self.detector_path)
        self.detector = load_detector(self.detector_path, self.device)
        features = reference_features(data, resolution=resolution, max_images=max_images, detector=self.detector,
                                      detector_md5=self.detector_md5, device=self.device, cache=cache, log=log)
        mean, cov = metric_math.feature_statistics(features.to(self.device))
        self.real = dict(features=features, mean=mean, cov=cov)
        self.data, self.resolution, self.max_images = data, resolution, max_images
        self._noted = False

    def evaluate(self, G, metrics: Sequence[str], *, num_gen: int, seed: int = 0, batch_size: int = 64,
                 steps: Optional[int] = None, inner_steps: Optional[int] = None) -> Dict:
        """Scores of G's images of seeds seed .. seed + num_gen - 1 against the training set.

        Returns:
            dict(results={metric: value}, num_gen, num_real, seconds={'generate_and_detect', 'metrics'}).
        """
        if G.img_resolution != self.resolution:
            raise ValueError(f'the generator makes {G.img_resolution} px images; the reference is at {self.resolution} px')
        seeds = list(range(seed, seed + num_gen))
        start = time.perf_counter()
        fake = image_features(self.detector, generate.batches(G, seeds, device=self.device, batch_size=batch_size, steps=steps,
                                                              inner_steps=inner_steps),
                              device=self.device, probabilities='is' in metrics)
        mid = time.perf_counter()
        fewest, dim = min(num_gen, self.real['features'].shape[0]), self.real['features'].shape[1]
        if 'fid' in metrics and fewest <= dim and self.log is not None and not self._noted:
            self.log(f'Note: FID from {fewest} images of {dim} features: a rank-deficient covariance, and an FID biased upward by '
                     'it. Compare FIDs at equal image counts only (the few-shot sets: a few hundred reals).')
            self._noted = True
        results = compute(self.real, fake, metrics, device=self.device)
        return dict(results=results, num_gen=num_gen, num_real=int(self.real['features'].shape[0]),
                    seconds=dict(generate_and_detect=mid - start, metrics=time.perf_counter() - mid))


def reference_of(snapshot_path: str, data: Optional[str]):
    """(data path, max_images) of the reference: --data, else the snapshot's own training set."""
    if data is not None:
        return data, None
    options = snapshot.load(snapshot_path)['options']
    try:
        kwargs = options['dataset_kwargs']
        return kwargs['path'], kwargs.get('max_images')
    except (KeyError, TypeError) as err:
        raise click.ClickException(f'{snapshot_path} does not record its training set; pass --data PATH.') from err


def default_num_gen(G) -> int:
    """The paper's sample count for this generator's decoder (PAPER_NUM_GEN)."""
    decoder = G.init_kwargs['decoder']
    if decoder not in PAPER_NUM_GEN:
        raise click.ClickException(f'no paper sample count for the {decoder!r} decoder; pass --num-gen N.')
    return PAPER_NUM_GEN[decoder]

#----------------------------------------------------------------------------

def _default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


@click.command()
@click.option('--snapshot', 'snapshot_path', help='RS-IMLE snapshot (snapshot-epoch-*.pt of `rtm-mapping imle train`)', required=True, metavar='PT')
@click.option('--data', help='Reference images (folder or zip)  [default: the snapshot\'s training set]', type=click.Path(exists=True), metavar='PATH')
@click.option('--metrics', 'metrics_text', help=f'Comma-separated, of {", ".join(METRICS)}', default=','.join(METRICS), show_default=True, metavar='LIST')
@click.option('--num-gen', help='Generated images  [default: the paper\'s, 50000 CIFAR-10, 30000 CelebA-HQ, 5000 few-shot]',
              type=click.IntRange(min=PRDC_K + 1), metavar='N')
@click.option('--seed', help='Generated image i is that of seed SEED + i', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--map-h', 'steps', help='RTM refinement steps H  [default: as trained]', type=click.IntRange(min=1))
@click.option('--map-l', 'inner_steps', help='RTM inner cycles L  [default: as trained]', type=click.IntRange(min=1))
@click.option('--ema/--no-ema', help='The moving average of the weights (what the paper evaluates), or the trained weights', default=True, show_default=True)
@click.option('--batch', 'batch_size', help='Images per generator call', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--cache/--no-cache', help='Cache the training set\'s features (DNNLIB_CACHE_DIR/gan-metrics)', default=True, show_default=True)
@click.option('--out', help='JSON results file  [default: <snapshot name>-metrics.json beside it]', type=click.Path(dir_okay=False), metavar='FILE')
@click.option('--device', help='Where to run', type=click.Choice(['cpu', 'cuda']), default=_default_device(), show_default=True)
def metrics_command(snapshot_path, data, metrics_text, num_gen, seed, steps, inner_steps, ema, batch_size, cache, out, device):
    """FID, Precision/Recall (k = 3), Density/Coverage and IS of an RS-IMLE snapshot against its training set (§4).

    \b
    Examples:
      rtm-mapping imle metrics --snapshot run/snapshot-epoch-010000.pt
      rtm-mapping imle metrics --snapshot run/snapshot-epoch-010000.pt --metrics fid --num-gen 10000 --map-h 32
    """
    names = parse_metrics(metrics_text)
    if device == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device cuda was given but torch sees no CUDA device; pass --device cpu.')
    G = snapshot.load_generator(snapshot_path, ema=ema, device=device)
    generate.check_steps(G, steps, inner_steps)
    num_gen = num_gen or default_num_gen(G)
    if 'is' in names and num_gen < IS_SPLITS:
        raise click.ClickException(f'--num-gen {num_gen}: the Inception Score needs at least {IS_SPLITS} images.')
    data, max_images = reference_of(snapshot_path, data)
    evaluator = Evaluator(data, resolution=G.img_resolution, max_images=max_images, device=device, cache=cache, log=click.echo)
    result = evaluator.evaluate(G, names, num_gen=num_gen, seed=seed, batch_size=batch_size, steps=steps, inner_steps=inner_steps)
    rtm = G.mapper == 'rtm'
    report = dict(snapshot=os.path.abspath(snapshot_path), data=os.path.abspath(data), max_images=max_images, metrics=names,
                  weights='G_ema' if ema else 'G', mapper=G.mapper, decoder=G.init_kwargs['decoder'],
                  steps=(steps or G.mapping.steps) if rtm else None, inner_steps=(inner_steps or G.mapping.inner_steps) if rtm else None,
                  seeds=[seed, seed + num_gen - 1], prdc_k=PRDC_K, detector=evaluator.detector_path, detector_md5=evaluator.detector_md5,
                  device=device, **result)
    out = out or os.path.splitext(snapshot_path)[0] + '-metrics.json'
    with open(out, 'w') as f:
        json.dump(report, f, indent=2)
    click.echo(json.dumps(report['results'], indent=2))
    click.echo(f'Wrote {out}')

#----------------------------------------------------------------------------
