"""Precision, Recall, Density and Coverage (PRDC) as in Table 3 of the RTM paper, as official StyleGAN2-ADA metrics.

Table 3 (paper §4.3, App. G) was computed with StudioGAN's protocol (Kang et al. 2021):
Improved Precision/Recall (Kynkäänniemi et al. 2019) and Density/Coverage (Naeem et al. 2020),
k = 5 nearest neighbours, on the Inception-v3 pool features that FID uses, with as many generated
images as reference images. The official code only has pr50k3 (VGG16 features, k = 3).

Definitions, for real features X (N rows), fake features Y (M rows) and NND_k(x) the distance from
x to its k-th nearest neighbour in its own set, the point itself excluded (Naeem et al., Eq. 1-4):

    precision = (1/M) sum_j 1[exists i: |Y_j - X_i| < NND_k(X_i)]
    recall    = (1/N) sum_i 1[exists j: |X_i - Y_j| < NND_k(Y_j)]
    density   = (1/kM) sum_j sum_i 1[|Y_j - X_i| < NND_k(X_i)]
    coverage  = (1/N) sum_i 1[exists j: |X_i - Y_j| < NND_k(X_i)]

The balls are open (strict `<`), as in Naeem et al.'s reference code `prdc`, which StudioGAN uses;
NVIDIA's pr50k3 uses closed balls (`<=`). The two differ only on exact ties.

The math (`knn_radii`, `prdc`) is pure torch. The metric functions take the official
`metric_utils.MetricOptions` and import the official `metrics` package inside the function, so
this module imports without a checkout. `register_metrics()` adds them to `metric_main` of
StyleGAN2-ADA or StyleGAN3, so that `--metrics=` of train.py and calc_metrics.py accepts them.
"""

import dataclasses
from typing import Callable, Dict, Iterable, List, Optional

import torch

from rtm_mapping import detectors
from stylegan2_ada_patch import checkout

#----------------------------------------------------------------------------
# The math.

def _mean64(*feature_sets: torch.Tensor) -> torch.Tensor:
    """The mean of all rows of the given [N, F] sets, in float64 (summed without a float64 copy of them)."""
    total = sum(features.sum(dim=0, dtype=torch.float64) for features in feature_sets)
    return total / sum(features.shape[0] for features in feature_sets)


def _block_distances(rows: torch.Tensor, cols: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [len(rows), len(cols)] in float64, both blocks shifted by `centre` first.

    torch.cdist computes them through the matrix product, |x - c|^2 + |y - c|^2 - 2 (x - c).(y - c), which
    cancels: in float32, features far from the origin (an offset of 100 in every feature) lose the digits
    that decide whether a point is inside a ball. Centred on the features' mean and in float64, as the
    reference `prdc` computes its distances (scikit-learn's pairwise_distances upcasts float32 to float64),
    the comparisons with the radii agree with an exact computation but for ties.
    """
    rows = rows.to(torch.float64) - centre
    cols = cols.to(torch.float64) - centre
    return torch.cdist(rows.unsqueeze(0), cols.unsqueeze(0))[0]


def knn_radii(features: torch.Tensor, k: int, row_batch_size: int = 10000, col_batch_size: int = 10000) -> torch.Tensor:
    """Distance from each row to its k-th nearest neighbour among the other rows, NND_k.

    Memory is bounded by one [row_batch_size, col_batch_size] block of float64 distances: the k + 1
    smallest distances of each row (itself included, at distance 0) are kept while the columns stream by.

    Args:
        features: [N, F] feature vectors, N > k.
        k: Neighbourhood size; the point itself does not count.
        row_batch_size, col_batch_size: Block size of the distance computation.
    Returns:
        [N] float64 radii, on the device of `features`.
    """
    num = features.shape[0]
    if not (isinstance(k, int) and 1 <= k < num):
        raise ValueError(f'k must be an integer in [1, {num - 1}] for {num} feature vectors, got {k!r}')
    centre = _mean64(features)
    radii = []
    for rows in features.split(row_batch_size):
        best = None
        for cols in features.split(col_batch_size):
            dist = _block_distances(rows, cols, centre)
            nearest = dist.topk(min(k + 1, dist.shape[1]), dim=1, largest=False).values
            best = nearest if best is None else torch.cat([best, nearest], dim=1)
            best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])    # best[:, 0] is the point itself.
    return torch.cat(radii)


def prdc(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    k: int = 5,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
) -> Dict[str, float]:
    """Precision, recall, density and coverage of fake features against real ones (see the module docstring).

    One pass over [fake block, real block] distance blocks after the two radius passes, so
    memory stays at one block of float64 distances even for 50k x 50k sets. Distances are computed
    in float64 on features centred on their mean (see _block_distances).

    Args:
        real_features: [N, F] reference features X.
        fake_features: [M, F] generated features Y.
        k: Neighbourhood size (Table 3: 5).
        row_batch_size, col_batch_size: Block size of the distance computation.
    Returns:
        dict(precision=..., recall=..., density=..., coverage=...), Python floats.
    """
    if real_features.ndim != 2 or fake_features.ndim != 2 or real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f'expected [N, F] and [M, F] features, got {list(real_features.shape)} and {list(fake_features.shape)}')
    real_radii = knn_radii(real_features, k, row_batch_size, col_batch_size)
    fake_radii = knn_radii(fake_features, k, row_batch_size, col_batch_size)

    centre = _mean64(real_features, fake_features)
    device = real_features.device
    fake_in_real_ball = torch.zeros([fake_features.shape[0]], dtype=torch.bool, device=device)    # precision
    real_ball_count   = torch.zeros([fake_features.shape[0]], dtype=torch.int64, device=device)   # density
    real_in_fake_ball = torch.zeros([real_features.shape[0]], dtype=torch.bool, device=device)    # recall
    real_ball_covered = torch.zeros([real_features.shape[0]], dtype=torch.bool, device=device)    # coverage
    for fake_start in range(0, fake_features.shape[0], row_batch_size):
        fakes = slice(fake_start, fake_start + row_batch_size)
        for real_start in range(0, real_features.shape[0], col_batch_size):
            reals = slice(real_start, real_start + col_batch_size)
            dist = _block_distances(fake_features[fakes], real_features[reals], centre)     # [fakes, reals]
            inside_real = dist < real_radii[reals].unsqueeze(0)                     # Y_j in B(X_i, NND_k(X_i))
            inside_fake = dist < fake_radii[fakes].unsqueeze(1)                     # X_i in B(Y_j, NND_k(Y_j))
            fake_in_real_ball[fakes] |= inside_real.any(dim=1)
            real_ball_count[fakes] += inside_real.sum(dim=1)
            real_ball_covered[reals] |= inside_real.any(dim=0)
            real_in_fake_ball[reals] |= inside_fake.any(dim=0)
    return dict(
        precision = float(fake_in_real_ball.to(torch.float64).mean()),
        recall    = float(real_in_fake_ball.to(torch.float64).mean()),
        density   = float(real_ball_count.to(torch.float64).mean() / k),
        coverage  = float(real_ball_covered.to(torch.float64).mean()),
    )

#----------------------------------------------------------------------------
# Official-style metrics.

@dataclasses.dataclass(frozen=True)
class PRDCMetric:
    """One registered PRDC metric: which features, which k, how many images."""
    name:           str             # Metric name for --metrics=; result keys are <name>_precision, _recall, _density, _coverage.
    detector:       str             # Feature network, one of rtm_mapping.detectors.NAMES.
    k:              int = 5         # Neighbourhood size.
    max_real:       Optional[int] = 200000   # Reference images: the dataset without x-flips, at most this many; None = all.
    num_gen:        Optional[int] = None     # Generated images, None = as many as reference images (StudioGAN's protocol).
    row_batch_size: int = 10000     # Block size of the distance computation (memory: one block of float64 distances).
    col_batch_size: int = 10000
    doc:            str = ''


# The registered metrics, in one table. Both detectors are called with return_features=True, the
# features of fid50k_full (Inception-v3 pool3, 2048-d) and of pr50k3_full (VGG16 fc2, 4096-d).
METRICS = {m.name: m for m in [
    PRDCMetric(name='prdc_full', detector='inception', k=5,
               doc='Table 3 protocol: Inception-v3 pool features (as fid50k_full), k = 5, the full dataset '
                   '(no x-flips, at most 200k) as reference, as many generated images as reference images '
                   '(50k on CIFAR-10).'),
    PRDCMetric(name='prdc_vgg_full', detector='vgg16', k=5,
               doc='The same on the VGG16 features of pr50k3_full, with k = 5 instead of pr50k3\'s 3.'),
]}


def compute_prdc(opts, metric: PRDCMetric) -> Dict[str, float]:
    """Compute one PRDC metric with the official feature pipeline (`metric_utils.compute_feature_stats_for_*`).

    Args:
        opts: metrics.metric_utils.MetricOptions, as the official metric functions get it.
        metric: What to compute.
    Returns:
        {'<name>_precision': ..., '<name>_recall': ..., '<name>_density': ..., '<name>_coverage': ...};
        NaN on ranks other than 0 (metric_main.calc_metric broadcasts rank 0's values).
    """
    from metrics import metric_utils

    opts.dataset_kwargs.update(max_size=None, xflip=False)
    detector_url = detectors.url_of(metric.detector, checkout.loaded())
    detector_kwargs = dict(return_features=True)

    real_features = metric_utils.compute_feature_stats_for_dataset(
        opts=opts, detector_url=detector_url, detector_kwargs=detector_kwargs,
        rel_lo=0, rel_hi=0, capture_all=True, max_items=metric.max_real).get_all_torch()
    num_gen = real_features.shape[0] if metric.num_gen is None else metric.num_gen
    fake_features = metric_utils.compute_feature_stats_for_generator(
        opts=opts, detector_url=detector_url, detector_kwargs=detector_kwargs,
        rel_lo=0, rel_hi=1, capture_all=True, max_items=num_gen).get_all_torch()

    keys = ('precision', 'recall', 'density', 'coverage')
    if opts.rank != 0:
        return {f'{metric.name}_{key}': float('nan') for key in keys}
    values = prdc(real_features.to(opts.device), fake_features.to(opts.device), k=metric.k,
                  row_batch_size=metric.row_batch_size, col_batch_size=metric.col_batch_size)
    return {f'{metric.name}_{key}': values[key] for key in keys}


# Official metric: detectors it loads (metrics/metric_main.py of StyleGAN2-ADA and StyleGAN3; the
# equivariance metrics, StyleGAN3's only, load none).
OFFICIAL_METRICS = {
    'fid50k_full': ('inception',), 'kid50k_full': ('inception',), 'pr50k3_full': ('vgg16',),
    'ppl2_wend':   ('vgg16',),     'is50k':       ('inception',), 'fid50k':      ('inception',),
    'kid50k':      ('inception',), 'pr50k3':      ('vgg16',),     'ppl_zfull':   ('vgg16',),
    'ppl_wfull':   ('vgg16',),     'ppl_zend':    ('vgg16',),     'ppl_wend':    ('vgg16',),
    'eqt50k_int':  (),             'eqt50k_frac': (),             'eqr50k':      (),
}


def detectors_needed(metrics: Iterable[str]) -> List[str]:
    """Detectors (of rtm_mapping.detectors.NAMES) that a list of metric names loads: official ones and ours.
    Metrics neither knows are left out."""
    names = []
    for metric in metrics:
        if metric in OFFICIAL_METRICS:
            names.extend(OFFICIAL_METRICS[metric])
        elif metric in METRICS:
            names.append(METRICS[metric].detector)
    return sorted(set(names))


def metric_function(metric: PRDCMetric) -> Callable:
    """The function metric_main registers: named like the metric (register_metric keys by __name__)."""
    def fn(opts):
        return compute_prdc(opts, metric)
    fn.__name__ = fn.__qualname__ = metric.name
    fn.__doc__ = metric.doc
    return fn


def register_metrics(*extra: PRDCMetric) -> None:
    """Register METRICS (and any `extra` PRDCMetric) with the official metric_main. Idempotent.

    Call it before the official code validates --metrics; the StyleGAN2-ADA or StyleGAN3 checkout must be on sys.path.
    """
    from metrics import metric_main
    for metric in [*METRICS.values(), *extra]:
        metric_main.register_metric(metric_function(metric))   # Keyed by name: registering again replaces it.

#----------------------------------------------------------------------------
