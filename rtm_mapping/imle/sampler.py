"""RS-IMLE's latent selection (RTM paper §3.1, eq. 1; Vashist et al. 2024), in the order of eq. (1):

    1. pool       m latents z~_j ~ N(0, I)                       pool_latents, pool_size_for
    2. decode     G(z~_j), no gradient, in batches               decode_features
    3. features   phi: a fixed random projection to 800-D        PixelFeatures, LPIPSFeatures
    4. rejection  remove pool samples too close to the data      match (the rule below)
    5. nearest    sigma(i) = argmin over the remaining samples   match
    6. jitter     z~_sigma(i) + N(0, jitter_std^2)                select_latents

`select_latents` runs all six; the training loop calls it once per re-selection (the schedule is the
loop's) and trains G(z_i) toward x_i with the loss of rtm_mapping.imle.loss.

The rejection rule, on Euclidean distances d(i, j) = ||phi(x_i) - phi(G(z~_j))||, strict inequality:
    knn_ignore = k     RS-IMLE's code: for each training image i, take its k nearest pool samples
                       (ties: lower pool index first); those with d(i, j) < epsilon are removed. A pool
                       sample is removed if it is so for any image. (RS-IMLE's code applies this per
                       database of 1024 pool samples, imle_db_size, so it removes up to k per image per
                       1024 samples; here the k nearest are taken over the whole pool.)
    knn_ignore = None  the paper's words (§3.1): every pool sample closer than epsilon to some training
                       image is removed.
    epsilon = 0        removes nothing: plain IMLE.
Then each image takes its nearest remaining sample (ties: lower pool index). An image all of whose pool
samples were removed is "unmatched": select_latents keeps its previous latent (as RS-IMLE's code does)
or, at the first selection, takes its nearest sample with the rejection ignored.

Search: exact nearest neighbours by blocked matrix products, never an n x m matrix. One pass over the
pool computes float32 squared distances block by block (one GEMM per block on augmented vectors
[-2x, 1, |x|^2] . [y, |y|^2, 1], both centred on the data mean) and keeps each image's `candidates`
nearest; the paper's rule also keeps each pool sample's nearest image distance. The candidates are then
re-ranked with float64 distances computed as sum((x - y)^2), which define every result, and certified
against a rigorous bound on the float32 error (which grows with the features' norms: centring keeps it
small for features far from the origin). An image whose answer is not certified, or whose candidates
were all rejected, is searched again, alone with the others of its kind: masked, in float64, with twice
the candidates, until certified. So the results equal brute force on float64 distances, and the second
pass costs what those rare images cost. Block sizes follow a memory budget (default_memory_budget).

Distributed (torch.distributed initialised): every rank calls select_latents (or match) the same way;
each decodes and searches its slice of the pool; candidates are merged exactly; every rank returns the
same latents. The pool is drawn in chunks of 1024 from seeds derived from one draw of `generator`
(broadcast from rank 0), so it does not depend on the number of ranks.
"""

import contextlib
import math
import time
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

FEATURE_DIM = 800       # RS-IMLE's proj_dim
POOL_CHUNK = 1024       # latents drawn per seed; RS-IMLE's pool size is a multiple of this (its imle_db_size)
FEATURES = ('pixels', 'lpips')

Progress = Callable[[str, int, int], None]     # progress(stage, done, total); stage 'decode' or 'search'

# A selection's randomness comes from one seed s < 2^62: latents from s + chunk, the decoder's noise from
# (s ^ NOISE_SALT) + pool index, the jitter from s ^ JITTER_SALT: three streams that never share a seed.
NOISE_SALT = 0x2A4E4F4953455F5F
JITTER_SALT = 0x154A49545445525F

#----------------------------------------------------------------------------
# 1. The pool.

def pool_size_for(num_images: int, force_factor: float, multiple: int = POOL_CHUNK) -> int:
    """RS-IMLE's pool size: ceil(force_factor * num_images / multiple) * multiple."""
    if not (num_images >= 1 and force_factor > 0 and multiple >= 1):
        raise ValueError(f'need num_images >= 1, force_factor > 0, multiple >= 1; got {num_images}, {force_factor}, {multiple}')
    return math.ceil(force_factor * num_images / multiple) * multiple


def pool_latents(seed: int, pool_size: int, z_dim: int, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
    """Latents start..stop of the pool drawn from `seed`: float32 [stop - start, z_dim] on the CPU.

    Chunk c (latents c * 1024 ... c * 1024 + 1023) is N(0, I) from torch.Generator().manual_seed(seed + c),
    so any slice of the pool can be drawn alone, and a pool does not depend on how ranks split it.
    """
    stop = pool_size if stop is None else stop
    if not 0 <= start <= stop <= pool_size:
        raise ValueError(f'slice {start}:{stop} is not inside a pool of {pool_size}')
    parts = []
    for chunk in range(start // POOL_CHUNK, (stop + POOL_CHUNK - 1) // POOL_CHUNK):
        z = torch.randn([POOL_CHUNK, z_dim], generator=torch.Generator().manual_seed(seed + chunk))
        lo, hi = max(start, chunk * POOL_CHUNK), min(stop, (chunk + 1) * POOL_CHUNK)
        parts.append(z[lo - chunk * POOL_CHUNK:hi - chunk * POOL_CHUNK])
    return torch.cat(parts) if parts else torch.empty([0, z_dim])

#----------------------------------------------------------------------------
# 2. Decoding the pool, with step 3 applied on the fly: only the features are kept.

@torch.no_grad()
def decode_features(G, latents: torch.Tensor, features, *, batch_size: int, device, noise_seed: int = 0,
                    offset: int = 0, progress: Optional[Progress] = None) -> torch.Tensor:
    """phi(G(z)) for latents [m, z_dim], in batches, without gradients, G in the mode it is in.

    The decoder's noise (if any) of the batch starting at pool index offset + i comes from a generator
    on `device` seeded with noise_seed + offset + i: reproducible, and the same in every process.
    Returns float32 [m, dim] on `device`.
    """
    out = torch.empty([latents.shape[0], features.dim], device=device)
    for i in range(0, latents.shape[0], batch_size):
        generator = torch.Generator(device=device).manual_seed(noise_seed + offset + i)
        z = latents[i:i + batch_size].to(device)
        out[i:i + z.shape[0]] = features(G(z, generator=generator))
        if progress is not None:
            progress('decode', i + z.shape[0], latents.shape[0])
    return out

#----------------------------------------------------------------------------
# 3. Search features phi, of the decoded pool (step 2) and, once, of the training images.

def _to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images -> float32 [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1
    return images.to(torch.float32)


class PixelFeatures:
    """phi(x) = normalize(flatten(area_downsample(x)) @ P): RS-IMLE's default search features ('l2').

    P is a fixed Gaussian [C * r * r, dim] matrix with unit-norm columns drawn from `seed`, so every
    coordinate of phi is a projection on a random unit direction; the result is L2-normalised, so
    distances lie in [0, 2]. RS-IMLE's code normalises P's rows instead and downsamples by nearest
    interpolation; after the final normalisation both are random projections of the same kind.

    Args:
        img_resolution: Side of the images.
        resolution: Side they are area-downsampled to first; None = img_resolution (RS-IMLE's default).
        dim: Output dimension (RS-IMLE's 800).
        seed: Seed of P; the same seed gives the same features in every process.
        img_channels: Channels of the images.
    """

    def __init__(self, *, img_resolution: int, resolution: Optional[int] = None, dim: int = FEATURE_DIM, seed: int = 0, img_channels: int = 3):
        resolution = img_resolution if resolution is None else resolution
        if not (1 <= resolution <= img_resolution and img_resolution % resolution == 0):
            raise ValueError(f'resolution must divide img_resolution={img_resolution}, got {resolution}')
        self.img_resolution, self.resolution, self.dim, self.seed, self.img_channels = img_resolution, resolution, dim, seed, img_channels
        self._projection = dict()       # device -> P

    def projection(self, device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._projection:
            if 'cpu' not in self._projection:
                p = torch.randn([self.img_channels * self.resolution ** 2, self.dim], generator=torch.Generator().manual_seed(self.seed))
                self._projection['cpu'] = p / p.norm(dim=0, keepdim=True)
            self._projection[device] = self._projection['cpu'].to(device)
        return self._projection[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, R, R] (float [-1, 1] or uint8) -> [N, dim] float32 unit vectors."""
        x = _to_float_images(images)
        if x.shape[1:] != (self.img_channels, self.img_resolution, self.img_resolution):
            raise ValueError(f'expected images [N, {self.img_channels}, {self.img_resolution}, {self.img_resolution}], got {list(x.shape)}')
        if self.resolution != self.img_resolution:
            x = F.adaptive_avg_pool2d(x, self.resolution)
        return F.normalize(x.flatten(1) @ self.projection(x.device), dim=1)


class LPIPSFeatures:
    """phi(x) = normalize(S f(x)), f = the LPIPS vectors of the loss's vgg16 (IMLELoss.lpips_features),
    S a count sketch to `dim` coordinates drawn from `seed` (Charikar et al. 2002; feature hashing,
    Weinberger et al. 2009): each input coordinate is added, with a random sign, to one random output
    coordinate. It preserves inner products in expectation as a Gaussian projection does, but in O(F)
    memory: LPIPS vectors have F ~ 8 million coordinates at 256 px, where a dense 800-column Gaussian
    matrix would take 27 GB. (RS-IMLE's 'lpips' search projects each VGG layer densely.)
    """

    def __init__(self, loss, *, dim: int = FEATURE_DIM, seed: int = 0):
        self.loss, self.dim, self.seed = loss, dim, seed
        self._sketch = dict()           # (F, device) -> (bucket, sign)

    def sketch(self, num_inputs: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (num_inputs, torch.device(device))
        if key not in self._sketch:
            generator = torch.Generator().manual_seed(self.seed)
            bucket = torch.randint(0, self.dim, [num_inputs], generator=generator)
            sign = torch.randint(0, 2, [num_inputs], generator=generator).to(torch.float32) * 2 - 1
            self._sketch[key] = (bucket.to(device), sign.to(device))
        return self._sketch[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, R, R] (float [-1, 1] or uint8) -> [N, dim] float32 unit vectors."""
        f = self.loss.lpips_features(_to_float_images(images)).to(torch.float32)
        bucket, sign = self.sketch(f.shape[1], f.device)
        y = torch.zeros([f.shape[0], self.dim], device=f.device).index_add_(1, bucket, f * sign)
        return F.normalize(y, dim=1)


def build_features(name: str, *, img_resolution: int, loss=None, resolution: Optional[int] = None, dim: int = FEATURE_DIM, seed: int = 0):
    """The search features by name: 'pixels' (PixelFeatures) or 'lpips' (LPIPSFeatures of `loss`, an IMLELoss)."""
    if name == 'pixels':
        return PixelFeatures(img_resolution=img_resolution, resolution=resolution, dim=dim, seed=seed)
    if name == 'lpips':
        if loss is None:
            raise ValueError("features='lpips' needs the loss (an IMLELoss): its vgg16 computes them")
        return LPIPSFeatures(loss, dim=dim, seed=seed)
    raise ValueError(f'unknown search features {name!r}: use one of {", ".join(FEATURES)}')


@torch.no_grad()
def compute_features(features, images: torch.Tensor, *, batch_size: int, device) -> torch.Tensor:
    """phi of a stack of images (e.g. the training set, uint8 [n, 3, R, R] on the CPU), in batches, on `device`."""
    parts = [features(images[i:i + batch_size].to(device)) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(parts) if parts else torch.empty([0, features.dim], device=device)

#----------------------------------------------------------------------------
# 4-5. Exact blocked nearest neighbours, the rejection rule and the selection.

def default_memory_budget(device) -> int:
    """Bytes the search may use for its distance blocks: on CUDA a quarter of the free memory, at most 2 GiB; 256 MiB elsewhere."""
    device = torch.device(device)
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(2 << 30, free // 4))
    return 256 << 20


def search_blocks(rows: int, cols: int, dim: int, *, memory_budget: int, element_size: int = 4) -> Tuple[int, int]:
    """(row_block, col_block) of the distance blocks for `rows` queries against `cols` pool samples of
    `dim` features: three block-sized buffers (the GEMM output, top-k and minimum workspaces) and two
    copies of the column block's features fit `memory_budget` bytes. A benchmark compares match() with
    torch.mm of [rows, dim] x [dim, cols] (or of these blocks, when that product does not fit)."""
    row_block = max(1, min(rows, 4096, memory_budget // (3 * element_size * 256)))
    col_block = max(1, min(cols, memory_budget // (element_size * (3 * row_block + 2 * (dim + 10)))))
    if col_block >= 256:
        col_block -= col_block % 128
    return row_block, col_block


class Candidates(NamedTuple):
    """Each query's nearest pool samples found so far, and what is certain about the rest."""
    sq_dist: torch.Tensor   # [r, K] float64 squared distances sum((x - y)^2), ascending, ties by index; inf where index = -1
    index: torch.Tensor     # [r, K] int64 pool indices (global), -1 = none
    bound: torch.Tensor     # [r] float64: every pool sample not listed (and not masked) is at squared distance >= bound; inf = all listed


def _gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float dot product."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


@contextlib.contextmanager
def _exact_float32_matmul():
    """Full float32 products (no TF32 or bf16 passes): the error bound assumes them."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _sort_pairs(sq_dist: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (distance, index), invalid entries (index -1) last."""
    key = torch.where(index < 0, torch.full_like(index, torch.iinfo(torch.int64).max), index)
    order = key.sort(dim=1, stable=True).indices
    sq_dist, index = sq_dist.gather(1, order), index.gather(1, order)
    order = sq_dist.sort(dim=1, stable=True).indices
    return sq_dist.gather(1, order), index.gather(1, order)


def _pad(c: Candidates, width: int) -> Candidates:
    extra = width - c.index.shape[1]
    if extra <= 0:
        return c
    r = c.index.shape[0]
    return Candidates(torch.cat([c.sq_dist, c.sq_dist.new_full([r, extra], math.inf)], dim=1),
                      torch.cat([c.index, c.index.new_full([r, extra], -1)], dim=1), c.bound)


def _distributed(group) -> bool:
    return group is not False and torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size(group) > 1


def _all_gather(t: torch.Tensor, group) -> list:
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return parts


def _rerank(x: torch.Tensor, pool: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Squared distances sum((x_i - pool_j)^2) in float64 for the pool rows idx [r, K] of each query x [r, d],
    in row blocks of about 8 MB through reused buffers (fresh large buffers cost page faults on a CPU)."""
    r, K = idx.shape
    d = x.shape[1]
    out = torch.empty([r, K], dtype=torch.float64, device=x.device)
    step = max(1, (8 << 20) // max(1, K * d * 8))
    gathered = torch.empty([min(step, r) * K, d], dtype=pool.dtype, device=x.device)
    diff = torch.empty([min(step, r), K, d], dtype=torch.float64, device=x.device)
    x64 = x.to(torch.float64)
    for r0 in range(0, r, step):
        rows = min(step, r - r0)
        g = torch.index_select(pool, 0, idx[r0:r0 + rows].reshape(-1), out=gathered[:rows * K])
        block = diff[:rows]
        block.copy_(g.view(rows, K, d)).sub_(x64[r0:r0 + rows, None, :]).square_()
        torch.sum(block, dim=2, out=out[r0:r0 + rows])
    return out


def _local_search(x: torch.Tensor, pool: torch.Tensor, k: int, *, mask: Optional[torch.Tensor], offset: int, dtype: torch.dtype,
                  memory_budget: int, column_min: bool, progress: Optional[Progress]):
    """One blocked pass of queries x [r, d] over this process's pool [c, d]: each query's k nearest,
    re-ranked exactly, with a certified bound; and, if column_min, each pool sample's smallest
    (approximate) squared distance to a query with its error bound. mask [c] bool: excluded samples."""
    r, d = x.shape
    c = pool.shape[0]
    device = x.device
    kk = min(k, c)
    vals = torch.full([r, kk], math.inf, dtype=dtype, device=device)
    idx = torch.full([r, kk], -1, dtype=torch.int64, device=device)
    colmin = torch.full([c], math.inf, dtype=dtype, device=device) if column_min else None

    # Augmented vectors, centred on the queries' mean: [-2 x, 1, |x|^2] . [y, |y|^2, 1] = |x - y|^2,
    # padded with zeros to a multiple of 8.
    mu = x.to(torch.float64).mean(dim=0).to(dtype)
    width = (d + 2 + 7) // 8 * 8
    xc = x.to(dtype) - mu
    xa = torch.zeros([r, width], dtype=dtype, device=device)
    xa[:, :d], xa[:, d], xa[:, d + 1] = -2 * xc, 1, xc.square().sum(dim=1)
    y_norm = torch.zeros([], dtype=dtype, device=device)               # max |y - mu| over the pool
    row_block, col_block = search_blocks(r, c, d, memory_budget=memory_budget, element_size=torch.finfo(dtype).bits // 8)
    ya_buffer = torch.empty([min(col_block, c) * width], dtype=dtype, device=device)
    s_buffer = torch.empty([min(row_block, r) * min(col_block, c)], dtype=dtype, device=device)

    with _exact_float32_matmul():
        for c0 in range(0, c, col_block):
            y = pool[c0:c0 + col_block]
            cols = y.shape[0]
            ya = ya_buffer[:cols * width].view(cols, width)
            torch.sub(y.to(dtype), mu, out=ya[:, :d])
            ya[:, d], ya[:, d + 1], ya[:, d + 2:] = torch.linalg.vector_norm(ya[:, :d], dim=1).square(), 1, 0
            y_norm = torch.maximum(y_norm, ya[:, d].max().sqrt())
            excluded = None if mask is None else mask[c0:c0 + cols]
            for r0 in range(0, r, row_block):
                rows = min(row_block, r - r0)
                s = torch.mm(xa[r0:r0 + rows], ya.t(), out=s_buffer[:rows * cols].view(rows, cols))     # approximate squared distances
                if excluded is not None:
                    s.masked_fill_(excluded, math.inf)
                if colmin is not None:
                    torch.minimum(colmin[c0:c0 + cols], s.amin(dim=0), out=colmin[c0:c0 + cols])
                v, j = s.topk(min(kk, cols), dim=1, largest=False, sorted=False)
                v, j = torch.cat([vals[r0:r0 + rows], v], dim=1), torch.cat([idx[r0:r0 + rows], j + c0], dim=1)
                best = v.topk(kk, dim=1, largest=False, sorted=False).indices
                vals[r0:r0 + rows], idx[r0:r0 + rows] = v.gather(1, best), j.gather(1, best)
            if progress is not None:
                progress('search', c0 + cols, c)

    # The float32 error of an approximate squared distance, |s - sum((x - y)^2)|, is at most
    # (gamma_width + gamma_d + 2u) (|x - mu| + |y - mu|)^2 (GEMM, squared norms, centring) plus the
    # float64 re-ranking's gamma_d (|x| + |y|)^2; twice that is used, and 1e-4 more for the norms' own rounding.
    x_norm = xa[:, d + 1].to(torch.float64).sqrt()
    x_raw_norm = x.norm(dim=1).to(torch.float64)
    y_raw_norm = y_norm.to(torch.float64) + mu.to(torch.float64).norm()    # |y| <= |y - mu| + |mu|
    u = torch.finfo(dtype).eps / 2
    err = 2 * (1 + 1e-4) ** 2 * ((_gamma(width, dtype) + _gamma(d, dtype) + 2 * u) * (x_norm + y_norm.to(torch.float64)) ** 2
                                 + _gamma(d, torch.float64) * (x_raw_norm + y_raw_norm) ** 2)

    # Exact re-ranking; the bound on everything not listed.
    valid = torch.isfinite(vals)
    sq = torch.where(valid, _rerank(x, pool, idx.clamp(min=0)), torch.full(vals.shape, math.inf, dtype=torch.float64, device=device))
    idx = torch.where(valid, idx + offset, torch.full_like(idx, -1))
    sq, idx = _sort_pairs(sq, idx)
    available = c if mask is None else int(c - mask.sum())
    if available <= kk:
        bound = torch.full([r], math.inf, dtype=torch.float64, device=device)
    else:
        bound = vals.max(dim=1).values.to(torch.float64) - err          # the kk-th smallest approximate distance, minus its error
    column = None if colmin is None else (colmin, err.max() if r else torch.zeros([], dtype=torch.float64, device=device))
    return _pad(Candidates(sq, idx, bound), k), column


def _search(x, pool, k, *, mask=None, offset=0, dtype=torch.float32, memory_budget, group=None, column_min=False, progress=None):
    """_local_search on every rank, merged: each query's k nearest over the whole pool (all ranks)."""
    local, column = _local_search(x, pool, k, mask=mask, offset=offset, dtype=dtype, memory_budget=memory_budget,
                                  column_min=column_min, progress=progress)
    if not _distributed(group):
        return local, column
    sq = torch.cat(_all_gather(local.sq_dist, group), dim=1)
    idx = torch.cat(_all_gather(local.index, group), dim=1)
    bound = torch.stack(_all_gather(local.bound, group)).amin(dim=0)
    sq, idx = _sort_pairs(sq, idx)
    bound = torch.minimum(bound, sq[:, k])                          # the candidates the merge drops are unlisted too
    return Candidates(sq[:, :k], idx[:, :k], bound), column


def _certified(c: Candidates, position: torch.Tensor) -> torch.Tensor:
    """Whether the entry at `position` [r] of each row is the position-th nearest for certain."""
    sq = c.sq_dist.gather(1, position[:, None])[:, 0]
    return (sq < c.bound) | torch.isinf(c.bound)


def _replace_rows(c: Candidates, rows: torch.Tensor, new: Candidates) -> Candidates:
    width = max(c.index.shape[1], new.index.shape[1])
    c, new = _pad(c, width), _pad(new, width)
    sq, idx, bound = c.sq_dist.clone(), c.index.clone(), c.bound.clone()
    sq[rows], idx[rows], bound[rows] = new.sq_dist, new.index, new.bound
    return Candidates(sq, idx, bound)


def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int, *, mask: Optional[torch.Tensor] = None, offset: int = 0,
            candidates: Optional[int] = None, memory_budget: Optional[int] = None, group=None) -> Candidates:
    """Exact k nearest pool samples of each query (squared distances sum((x - y)^2) in float64, ties by index).

    Args:
        queries: [r, d] float features, the same on every rank.
        pool: [c, d] this rank's pool features; their global indices start at `offset`.
        k: Neighbours wanted; fewer where the pool (less `mask`) is smaller.
        mask: [c] bool, pool samples to ignore.
        candidates: Neighbours kept per query in the first pass (default k + 8).
        memory_budget: Bytes for distance blocks (default_memory_budget).
        group: torch.distributed group (None = the default one if initialised; False = this process only).
    Returns:
        Candidates whose first k entries are certified.
    """
    memory_budget = memory_budget or default_memory_budget(queries.device)
    width = max(k, candidates or k + 8)
    result, _ = _search(queries, pool, width, mask=mask, offset=offset, memory_budget=memory_budget, group=group)
    position = torch.full([queries.shape[0]], k - 1, dtype=torch.int64, device=queries.device)
    todo = ~_certified(result, position)
    while bool(todo.any()):
        width *= 2
        rows = todo.nonzero()[:, 0]
        retry, _ = _search(queries[rows], pool, width, mask=mask, offset=offset, dtype=torch.float64, memory_budget=memory_budget, group=group)
        result = _replace_rows(result, rows, retry)
        todo = ~_certified(result, position)
    return result


class Match(NamedTuple):
    """What match() found."""
    index: torch.Tensor         # [n] int64: sigma(i), the pool index each image takes (unmatched: its nearest, rejection ignored)
    distance: torch.Tensor      # [n] float64: d(i, index[i])
    unmatched: torch.Tensor     # [n] bool: every pool sample was rejected
    rejected: torch.Tensor      # [c] bool: this rank's pool samples removed by the rule
    num_rejected: int           # pool samples removed, all ranks
    fallback_rows: int          # images that needed a second, masked or float64, search
    pool_size: int              # m, all ranks


def match(data_features: torch.Tensor, pool_features: torch.Tensor, *, epsilon: float, knn_ignore: Optional[int], offset: int = 0,
          candidates: Optional[int] = None, memory_budget: Optional[int] = None, progress: Optional[Progress] = None, group=None) -> Match:
    """Steps 4-5: the rejection rule (module docstring) and each image's nearest remaining pool sample.

    Args:
        data_features: [n, d] phi of the training images, the same on every rank.
        pool_features: [c, d] phi of this rank's pool samples, whose global indices start at `offset`.
        epsilon: Rejection radius (>= 0; 0 rejects nothing).
        knn_ignore: k of RS-IMLE's rule, or None for the paper's rule.
        candidates: Nearest samples kept per image in the one pass (default 2 k + 8, or 16 for knn_ignore=None);
            more make a second pass rarer and the one pass a little slower.
        memory_budget: Bytes for the distance blocks (default_memory_budget).
        progress: Called as progress('search', done, total) over the pool.
        group: torch.distributed group (None = the default one if initialised; False = this process only).
    Returns:
        Match, the same on every rank (but `rejected`, which is this rank's slice).
    """
    for name, t in (('data_features', data_features), ('pool_features', pool_features)):
        if t.ndim != 2 or not t.is_floating_point() or (t.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())):
            raise ValueError(f'{name} must be a finite float [N, dim] tensor, got {t.dtype} {list(t.shape)}')
    if data_features.shape[1] != pool_features.shape[1] or data_features.shape[0] == 0:
        raise ValueError(f'need n >= 1 data features and pool features of the same dim, got {list(data_features.shape)} and {list(pool_features.shape)}')
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0):
        raise ValueError(f'epsilon must be a number >= 0, got {epsilon!r}')
    if knn_ignore is not None and not (isinstance(knn_ignore, int) and knn_ignore >= 1):
        raise ValueError(f'knn_ignore must be a positive integer (RS-IMLE\'s rule) or None (the paper\'s rule), got {knn_ignore!r}')
    device = data_features.device
    x = data_features.to(torch.float32)
    pool = pool_features.to(device=device, dtype=torch.float32)
    c = pool.shape[0]
    total = torch.tensor([c], device=device)
    if _distributed(group):
        torch.distributed.all_reduce(total, group=group)
    m = int(total)
    if m == 0:
        raise ValueError('the pool is empty')
    memory_budget = memory_budget or default_memory_budget(device)
    k = knn_ignore
    width = candidates or (2 * k + 8 if k is not None else 16)
    if k is not None:
        width = max(width, k)

    # One pass: each image's `width` nearest (and, for the paper's rule, each pool sample's nearest image).
    first, column = _search(x, pool, width, offset=offset, memory_budget=memory_budget, group=group, column_min=k is None, progress=progress)
    rejected_all, first, fallback = _reject(x, pool, first, column, eps2=float(epsilon) ** 2, k=k, offset=offset, pool_size=m,
                                            memory_budget=memory_budget, group=group)
    index, sq, unmatched, again = _select(x, pool, first, rejected_all, offset=offset, candidates=width, memory_budget=memory_budget, group=group)
    return Match(index=index, distance=sq.sqrt(), unmatched=unmatched, rejected=rejected_all[offset:offset + c],
                 num_rejected=int(rejected_all.sum()), fallback_rows=int((fallback | again).sum()), pool_size=m)


def _reject(x, pool, first: Candidates, column, *, eps2: float, k: Optional[int], offset: int, pool_size: int, memory_budget: int, group):
    """Step 4, the rule of the module docstring, from the one pass's candidates (first) and, for the
    paper's rule, its column minima. Returns the removed samples of the whole pool ([pool_size] bool, the
    same on every rank), the candidates (with certified k nearest for RS-IMLE's rule) and the images
    that needed a second search."""
    n, c = x.shape[0], pool.shape[0]
    rejected = torch.zeros([pool_size], dtype=torch.uint8, device=x.device)
    fallback = torch.zeros([n], dtype=torch.bool, device=x.device)
    if k is not None:
        # RS-IMLE's rule: each image's k nearest (certified; a second search where not) within epsilon.
        fallback = ~_certified(first, torch.full([n], k - 1, dtype=torch.int64, device=x.device))
        if bool(fallback.any()):
            rows = fallback.nonzero()[:, 0]
            first = _replace_rows(first, rows, nearest(x[rows], pool, k, offset=offset, candidates=2 * first.index.shape[1],
                                                       memory_budget=memory_budget, group=group))
        hit = (first.sq_dist[:, :k] < eps2) & (first.index[:, :k] >= 0)
        rejected[first.index[:, :k][hit]] = 1
    else:
        # The paper's rule: each of this rank's samples whose nearest image is within epsilon; exactly
        # where the float32 minimum is within its error of epsilon.
        colmin, err = column
        inside = colmin.to(torch.float64) + err < eps2
        unsure = ~inside & (colmin.to(torch.float64) - err < eps2)
        if bool(unsure.any()):
            cols = unsure.nonzero()[:, 0]
            inside[cols] = nearest(pool[cols], x, 1, memory_budget=memory_budget, group=False).sq_dist[:, 0] < eps2
        rejected[offset:offset + c] = inside.to(torch.uint8)
        if _distributed(group):
            torch.distributed.all_reduce(rejected, group=group)
    return rejected.bool(), first, fallback


def _select(x, pool, first: Candidates, rejected: torch.Tensor, *, offset: int, candidates: int, memory_budget: int, group):
    """Step 5: each image's nearest sample not rejected: its first such candidate where certified, else a
    second search with the rejected samples masked. An image with none is unmatched and takes its nearest
    sample, the rejection ignored. Returns (index, squared distance, unmatched, second search) per image."""
    ok = (first.index >= 0) & ~rejected[first.index.clamp(min=0)]
    found = ok.any(dim=1)
    position = torch.where(found, ok.to(torch.int32).argmax(dim=1), torch.zeros_like(first.index[:, 0]))     # the first True
    index = first.index.gather(1, position[:, None])[:, 0]
    sq = first.sq_dist.gather(1, position[:, None])[:, 0]
    exhausted = torch.isinf(first.bound)                               # every pool sample is listed
    unmatched = ~found & exhausted
    again = ~((found & _certified(first, position)) | unmatched)
    if bool(again.any()):
        rows = again.nonzero()[:, 0]
        masked = nearest(x[rows], pool, 1, mask=rejected[offset:offset + pool.shape[0]], offset=offset, candidates=candidates,
                         memory_budget=memory_budget, group=group)
        index[rows], sq[rows] = masked.index[:, 0], masked.sq_dist[:, 0]
        unmatched[rows] = masked.index[:, 0] < 0
    if bool(unmatched.any()):
        rows = unmatched.nonzero()[:, 0]
        anyway = nearest(x[rows], pool, 1, offset=offset, memory_budget=memory_budget, group=group)
        index[rows], sq[rows] = anyway.index[:, 0], anyway.sq_dist[:, 0]
    return index, sq, unmatched, again

#----------------------------------------------------------------------------
# 6. Jitter.

def jitter(z: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """z + N(0, std^2) noise drawn from `generator` (RS-IMLE's imle_perturb_coef, 0.001), so that images
    matched to the same pool sample do not train on the same latent."""
    return z + std * torch.randn(z.shape, generator=generator, device=generator.device, dtype=z.dtype).to(z.device)

#----------------------------------------------------------------------------
# All six steps.

def _rank_world(group=None) -> Tuple[int, int]:
    if _distributed(group):
        return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    return 0, 1


def _synchronize(device) -> None:
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def select_latents(G, data_features: torch.Tensor, *, pool_size: int, features, epsilon: float, knn_ignore: Optional[int],
                   batch_size: int, jitter_std: float, generator: torch.Generator, device, previous: Optional[torch.Tensor] = None,
                   candidates: Optional[int] = None, memory_budget: Optional[int] = None, progress: Optional[Progress] = None,
                   group=None) -> Tuple[torch.Tensor, dict]:
    """One RS-IMLE selection (§3.1, eq. 1): a fresh pool, decoded, searched, rejected, matched, jittered.

    Args:
        G: The generator (unwrapped, in the mode the caller wants: the pool is decoded as G(z, generator=...)
            under no_grad); needs G.z_dim.
        data_features: [n, dim] phi of the training images (compute_features), the same on every rank.
        pool_size: m, e.g. pool_size_for(n, force_factor).
        features: The search features phi (PixelFeatures, LPIPSFeatures) that made data_features.
        epsilon, knn_ignore: The rejection rule (module docstring).
        batch_size: Images decoded per batch.
        jitter_std: Standard deviation of the N(0, jitter_std^2) jitter added to each selected latent (RS-IMLE: 0.001).
        generator: Source of this selection's randomness (one draw; rank 0's is used on every rank).
        device: Where G runs and the search happens.
        previous: [n, z_dim] latents of the last selection, kept for unmatched images; None = their nearest sample.
        candidates, memory_budget, progress, group: see match().
    Returns:
        z [n, z_dim] float32 on the CPU, the same on every rank, and stats (plain numbers for stats.jsonl).
    """
    device = torch.device(device)
    rank, world = _rank_world(group)
    n = data_features.shape[0]
    if previous is not None and tuple(previous.shape) != (n, G.z_dim):
        raise ValueError(f'previous must be [n, z_dim] = [{n}, {G.z_dim}], got {list(previous.shape)}')
    if not (isinstance(pool_size, int) and pool_size >= 1 and batch_size >= 1 and jitter_std >= 0):
        raise ValueError(f'need pool_size >= 1, batch_size >= 1, jitter_std >= 0; got {pool_size}, {batch_size}, {jitter_std}')

    # 1. The pool: this rank's slice, from one seed shared by all ranks.
    seed = torch.randint(0, 2 ** 62, [1], generator=generator, device=generator.device).to(device)
    if world > 1:
        torch.distributed.broadcast(seed, 0, group=group)
    seed = int(seed)
    lo, hi = pool_size * rank // world, pool_size * (rank + 1) // world
    latents = pool_latents(seed, pool_size, G.z_dim, lo, hi)

    # 2-3. Decode and take features.
    _synchronize(device)
    t0 = time.perf_counter()
    pool_features = decode_features(G, latents, features, batch_size=batch_size, device=device, noise_seed=seed ^ NOISE_SALT,
                                    offset=lo, progress=progress)
    _synchronize(device)
    t1 = time.perf_counter()

    # 4-5. Reject and match.
    found = match(data_features.to(device), pool_features, epsilon=epsilon, knn_ignore=knn_ignore, offset=lo,
                  candidates=candidates, memory_budget=memory_budget, progress=progress, group=group)
    _synchronize(device)
    t2 = time.perf_counter()

    # The selected latents, from the ranks that hold them.
    index = found.index.cpu()
    mine = (index >= lo) & (index < hi)
    z = torch.zeros([n, G.z_dim])
    z[mine] = latents[index[mine] - lo]
    if world > 1:
        z = z.to(device)
        torch.distributed.all_reduce(z, group=group)
        z = z.cpu()

    # 6. Jitter, from the shared seed.
    z = jitter(z, jitter_std, torch.Generator().manual_seed(seed ^ JITTER_SALT))
    unmatched = found.unmatched.cpu()
    if previous is not None:
        z[unmatched] = previous.detach().cpu().to(z.dtype)[unmatched]

    distance = found.distance.cpu()
    stats = dict(
        pool_size            = found.pool_size,                         # m
        pool_seed            = seed,                                    # pool_latents(pool_seed, m, z_dim) redraws the pool
        rejected             = found.num_rejected,                      # pool samples removed by the rule
        rejected_frac        = found.num_rejected / found.pool_size,
        unmatched            = int(unmatched.sum()),                    # images with every sample removed
        fallback_rows        = found.fallback_rows,                     # images searched a second time
        distance_mean        = float(distance.mean()),                  # d(i, sigma(i)) in feature space
        distance_max         = float(distance.max()),
        decode_sec           = t1 - t0,                                 # this rank's pool slice
        search_sec           = t2 - t1,
        decode_img_per_sec   = (hi - lo) / max(t1 - t0, 1e-9),
        search_pairs_per_sec = n * (hi - lo) / max(t2 - t1, 1e-9),      # image-sample distances per second
    )
    return z, stats

#----------------------------------------------------------------------------
