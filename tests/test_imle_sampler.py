"""RS-IMLE's latent selection (rtm_mapping.imle.sampler) against brute force on the full distance matrix."""

import datetime
import json
import os

import pytest
import torch
import torch.nn.functional as F

from rtm_mapping import detectors
from rtm_mapping.imle import sampler
from rtm_mapping.imle.loss import IMLELoss
from rtm_mapping.imle.networks import Generator

#----------------------------------------------------------------------------
# The reference: every distance at once, the rule of the module docstring written out.

def brute_force(x, y, epsilon, knn_ignore):
    """(index, unmatched, rejected) from the full [n, m] float64 distance matrix."""
    d2 = (x.double()[:, None, :] - y.double()[None, :, :]).square().sum(dim=2)
    order = d2.sort(dim=1, stable=True).indices                    # by distance, ties by pool index
    if knn_ignore is None:
        rejected = (d2 < epsilon ** 2).any(dim=0)
    else:
        rejected = torch.zeros([y.shape[0]], dtype=torch.bool)
        for i, nearest in enumerate(order[:, :knn_ignore]):
            rejected[nearest[d2[i, nearest] < epsilon ** 2]] = True
    index = torch.empty([x.shape[0]], dtype=torch.int64)
    unmatched = torch.zeros([x.shape[0]], dtype=torch.bool)
    for i, row in enumerate(order):
        remaining = row[~rejected[row]]
        unmatched[i] = len(remaining) == 0
        index[i] = row[0] if unmatched[i] else remaining[0]
    return index, unmatched, rejected


def assert_matches_brute_force(x, y, epsilon, knn_ignore, **kwargs):
    found = sampler.match(x, y, epsilon=epsilon, knn_ignore=knn_ignore, **kwargs)
    index, unmatched, rejected = brute_force(x, y, epsilon, knn_ignore)
    assert torch.equal(found.rejected, rejected)
    assert torch.equal(found.unmatched, unmatched)
    assert torch.equal(found.index, index)
    assert found.num_rejected == int(rejected.sum()) and found.pool_size == y.shape[0]
    torch.testing.assert_close(found.distance, (x.double() - y[index].double()).norm(dim=1), rtol=1e-12, atol=1e-12)
    return found


def unit(n, d, seed):
    return F.normalize(torch.randn([n, d], generator=torch.Generator().manual_seed(seed)), dim=1)

#----------------------------------------------------------------------------

@pytest.mark.parametrize('knn_ignore', [1, 5, None])
def test_match_equals_brute_force(knn_ignore):
    for seed in range(4):
        x, y = unit(20, 12, 2 * seed), unit(150, 12, 2 * seed + 1)
        y = torch.cat([y, y[::3]])                                  # exact ties
        for epsilon in (0.7, 1.0, 1.2):                             # distances of unit vectors in 12-D: ~0.6 to ~1.8
            found = assert_matches_brute_force(x, y, epsilon, knn_ignore)
            assert_matches_brute_force(x, y, epsilon, knn_ignore, candidates=knn_ignore or 1, memory_budget=1 << 14)
        assert found.num_rejected > 0


def test_ties_take_the_lower_pool_index():
    y = unit(6, 4, 0)
    pool = torch.cat([y, y, y])                                     # sample j = j + 6 = j + 12
    x = torch.cat([y[:3], y[:3]])                                   # images on the pool, twice each
    found = assert_matches_brute_force(x, pool, 0.0, 5)
    assert found.index.tolist() == [0, 1, 2, 0, 1, 2]
    found = assert_matches_brute_force(x, pool, 1e-3, 2)            # each image's 2 nearest (j, j + 6) go; j + 12 stays
    assert found.index.tolist() == [12, 13, 14, 12, 13, 14]


def test_image_whose_k_nearest_are_all_rejected_takes_the_next():
    d = 8
    x = F.normalize(torch.randn([4, d], generator=torch.Generator().manual_seed(3)), dim=1)
    close = x[0] + 0.01 * unit(5, d, 4)                              # the 5 nearest of image 0, all within epsilon
    near = x[0] + 0.5 * unit(1, d, 5)                                # its nearest outside epsilon
    far = x[1:].repeat(3, 1) + 0.3 * unit(9, d, 6)
    pool = torch.cat([far[:4], close[:2], near, far[4:], close[2:]])
    for candidates in (None, 5):                                     # 5: the one pass keeps only the rejected ones
        found = assert_matches_brute_force(x, pool, 0.1, 5, candidates=candidates)
        assert found.index[0] == 6 and found.rejected.sum() >= 5
    assert found.fallback_rows >= 1


def test_epsilon_zero_is_plain_imle():
    x, y = unit(10, 6, 7), unit(40, 6, 8)
    for knn_ignore in (3, None):
        found = assert_matches_brute_force(x, y, 0.0, knn_ignore)
        assert found.num_rejected == 0
        assert torch.equal(found.index, (x @ y.t()).argmax(dim=1))


def test_pool_smaller_than_k():
    x, y = unit(5, 6, 9), unit(3, 6, 10)
    assert_matches_brute_force(x, y, 1.0, 5)
    assert_matches_brute_force(x, y, 1.4, 5)


def test_images_with_every_sample_rejected_are_unmatched():
    x, y = unit(6, 5, 11), unit(4, 5, 12)
    for knn_ignore in (4, None):
        found = assert_matches_brute_force(x, y, 3.0, knn_ignore)   # unit vectors: every distance < 2 < 3
        assert found.unmatched.all() and found.num_rejected == 4


def test_features_far_from_the_origin():
    # |x|^2 + |y|^2 - 2 x.y in float32 would lose every digit of these distances; centring and the exact re-ranking keep them.
    x, y = unit(15, 10, 13) + 1000, unit(120, 10, 14) + 1000
    for knn_ignore in (5, None):
        assert_matches_brute_force(x, y, 0.9, knn_ignore)


def test_search_blocks_fit_the_budget():
    for rows, cols, dim, budget in [(50000, 500000, 800, 2 << 30), (400, 4000, 800, 256 << 20), (3, 10 ** 6, 800, 1 << 20), (10, 10, 4, 100)]:
        rb, cb = sampler.search_blocks(rows, cols, dim, memory_budget=budget)
        assert 1 <= rb <= rows and 1 <= cb <= cols
        assert 4 * (3 * rb * cb + 2 * cb * (dim + 10)) <= max(budget, 4 * (3 + 2 * (dim + 10)))
    rb, cb = sampler.search_blocks(50000, 500000, 800, memory_budget=2 << 30)      # CIFAR-10 on a GPU: blocks a GEMM runs well
    assert rb == 4096 and cb >= 16384 and cb % 128 == 0


def test_bad_inputs_are_refused():
    x, y = unit(3, 4, 0), unit(5, 4, 1)
    with pytest.raises(ValueError, match='epsilon'):
        sampler.match(x, y, epsilon=-1, knn_ignore=5)
    with pytest.raises(ValueError, match='knn_ignore'):
        sampler.match(x, y, epsilon=0.1, knn_ignore=0)
    with pytest.raises(ValueError, match='finite'):
        sampler.match(x, y * float('nan'), epsilon=0.1, knn_ignore=5)
    with pytest.raises(ValueError, match='same dim'):
        sampler.match(x, unit(5, 3, 1), epsilon=0.1, knn_ignore=5)

#----------------------------------------------------------------------------
# The pool and the features.

def test_pool_size_and_latents():
    assert sampler.pool_size_for(100, 10) == 1024
    assert sampler.pool_size_for(389, 20) == 8192                  # ceil(7780 / 1024) * 1024
    assert sampler.pool_size_for(2048, 10) == 20480
    full = sampler.pool_latents(5, 3000, 7)
    assert full.shape == (3000, 7)
    assert torch.equal(sampler.pool_latents(5, 3000, 7, 1000, 2100), full[1000:2100])    # any slice alone
    assert torch.equal(sampler.pool_latents(5, 1500, 7), full[:1500])                    # a prefix of a larger pool
    assert not torch.equal(sampler.pool_latents(6, 3000, 7), full)
    assert abs(float(full.std()) - 1) < 0.05


def test_jitter():
    z = torch.randn([2000, 8], generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampler.jitter(z, 0.0, torch.Generator()), z)
    moved = sampler.jitter(z, 1e-3, torch.Generator().manual_seed(1))
    assert torch.equal(moved, sampler.jitter(z, 1e-3, torch.Generator().manual_seed(1)))
    assert abs(float((moved - z).std()) - 1e-3) < 1e-4


def test_pixel_features():
    features = sampler.PixelFeatures(img_resolution=16, resolution=8, dim=32, seed=3)
    p = features.projection('cpu')
    assert p.shape == (3 * 8 * 8, 32)
    torch.testing.assert_close(p.norm(dim=0), torch.ones(32))      # unit-norm columns
    small = torch.rand([4, 3, 8, 8], generator=torch.Generator().manual_seed(0)) * 2 - 1
    big = F.interpolate(small, scale_factor=2, mode='nearest')
    phi = features(big)
    torch.testing.assert_close(phi.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(phi, sampler.PixelFeatures(img_resolution=8, dim=32, seed=3)(small))    # area downsampling
    as_uint8 = ((big + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    torch.testing.assert_close(features(as_uint8), features(as_uint8.float() / 127.5 - 1))
    assert not torch.allclose(sampler.PixelFeatures(img_resolution=16, resolution=8, dim=32, seed=4)(big), phi)
    with pytest.raises(ValueError, match='resolution must divide'):
        sampler.PixelFeatures(img_resolution=16, resolution=5)


def test_lpips_features_sketch_the_loss_vectors(tmp_path):
    loss = IMLELoss(detectors.standin('vgg16', str(tmp_path / 'vgg16.pt')))
    features = sampler.build_features('lpips', img_resolution=16, loss=loss, dim=64, seed=1)
    images = torch.rand([3, 3, 16, 16], generator=torch.Generator().manual_seed(0)) * 2 - 1
    f = loss.lpips_features(images)
    bucket, sign = features.sketch(f.shape[1], 'cpu')
    sketched = torch.zeros([3, 64])
    for i in range(f.shape[1]):
        sketched[:, bucket[i]] += sign[i] * f[:, i]
    torch.testing.assert_close(features(images), F.normalize(sketched, dim=1))
    with pytest.raises(ValueError, match='needs the loss'):
        sampler.build_features('lpips', img_resolution=16)

#----------------------------------------------------------------------------
# All six steps.

Z_DIM = 8


def tiny_generator(seed=0):
    torch.manual_seed(seed)
    G = Generator(decoder='cifar10', mapper='rtm', z_dim=Z_DIM, w_dim=8, mapper_kwargs=dict(tokens=2, token_dim=8, steps=2),
                  decoder_kwargs=dict(width=8, stages=((1, 1), (4, 1), (8, 1)))).eval()
    with torch.no_grad():
        for block in G.synthesis.blocks:
            block.noise.strength.fill_(0.5)                         # noise that changes the images, as after training
    return G


def tiny_data(seed=1, n=12):
    return (torch.rand([n, 3, 8, 8], generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def test_select_latents_is_eq_1(tmp_path):
    G = tiny_generator()
    features = sampler.PixelFeatures(img_resolution=8, dim=16, seed=2)
    data = sampler.compute_features(features, tiny_data(), batch_size=5, device='cpu')
    kwargs = dict(pool_size=200, features=features, epsilon=1.1, knn_ignore=5, batch_size=32, jitter_std=1e-3, device='cpu')
    generator = torch.Generator().manual_seed(7)
    z, stats = sampler.select_latents(G, data, generator=generator, **kwargs)
    assert z.shape == (12, Z_DIM) and z.dtype == torch.float32
    json.dumps(stats)                                              # plain numbers, for stats.jsonl
    # The same selection by hand: the pool from its seed, decoded, matched by brute force.
    pool = sampler.pool_latents(stats['pool_seed'], 200, Z_DIM)
    pool_features = sampler.decode_features(G, pool, features, batch_size=32, device='cpu', noise_seed=stats['pool_seed'] ^ sampler.NOISE_SALT)
    index, unmatched, rejected = brute_force(data, pool_features, 1.1, 5)
    assert stats['rejected'] == int(rejected.sum()) > 0 and stats['unmatched'] == 0 and stats['pool_size'] == 200
    jitter = z - pool[index]
    assert 5e-4 < float(jitter.std()) < 2e-3                         # N(0, 0.001^2)
    # Reproducible from the generator's state, and the generator moves on.
    z_again, _ = sampler.select_latents(G, data, generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(z_again, z)
    z_next, _ = sampler.select_latents(G, data, generator=generator, **kwargs)
    assert not torch.allclose(z_next, z)


def test_unmatched_images_keep_their_previous_latents():
    G = tiny_generator()
    features = sampler.PixelFeatures(img_resolution=8, dim=16, seed=2)
    data = sampler.compute_features(features, tiny_data(), batch_size=12, device='cpu')
    previous = torch.randn([12, Z_DIM])
    kwargs = dict(pool_size=40, features=features, epsilon=3.0, knn_ignore=None, batch_size=40, jitter_std=0.0, device='cpu')
    z, stats = sampler.select_latents(G, data, generator=torch.Generator().manual_seed(0), previous=previous, **kwargs)
    assert stats['unmatched'] == 12 and torch.equal(z, previous)
    z, stats = sampler.select_latents(G, data, generator=torch.Generator().manual_seed(0), **kwargs)
    pool = sampler.pool_latents(stats['pool_seed'], 40, Z_DIM)
    pool_features = sampler.decode_features(G, pool, features, batch_size=40, device='cpu', noise_seed=stats['pool_seed'] ^ sampler.NOISE_SALT)
    assert torch.equal(z, pool[brute_force(data, pool_features, 3.0, None)[0]])    # the first selection: nearest anyway

#----------------------------------------------------------------------------
# Distributed: two gloo processes on the CPU.

def _distributed_worker(rank, world, store, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))        # a lost peer fails the test, never hangs it
    try:
        results = dict()
        x, y = unit(25, 12, 20), unit(300, 12, 21)
        lo, hi = 300 * rank // world, 300 * (rank + 1) // world
        for knn_ignore in (5, None):
            found = sampler.match(x, y[lo:hi], epsilon=1.0, knn_ignore=knn_ignore, offset=lo, candidates=6)
            results[knn_ignore] = found._asdict()
        G = tiny_generator()
        features = sampler.PixelFeatures(img_resolution=8, dim=16, seed=2)
        data = sampler.compute_features(features, tiny_data(), batch_size=12, device='cpu')
        results['z'], results['stats'] = sampler.select_latents(
            G, data, pool_size=64, features=features, epsilon=1.1, knn_ignore=5, batch_size=16, jitter_std=1e-3,
            generator=torch.Generator().manual_seed(100 + rank), device='cpu')     # rank 0's seed is used
        torch.save(results, os.path.join(out, f'rank{rank}.pt'))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_select_what_one_selects(tmp_path):
    context = torch.multiprocessing.spawn(_distributed_worker, args=(2, str(tmp_path / 'store'), str(tmp_path)), nprocs=2, join=False)
    for _ in range(60):                                              # a guard against a hung worker (10 minutes), not a timing
        if context.join(timeout=10):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail('the two gloo workers did not finish')
    ranks = [torch.load(str(tmp_path / f'rank{r}.pt'), weights_only=False) for r in range(2)]
    x, y = unit(25, 12, 20), unit(300, 12, 21)
    for knn_ignore in (5, None):
        index, unmatched, rejected = brute_force(x, y, 1.0, knn_ignore)
        for r, result in enumerate(ranks):
            found = result[knn_ignore]
            assert torch.equal(found['index'], index) and torch.equal(found['unmatched'], unmatched)
            assert torch.equal(found['rejected'], rejected[150 * r:150 * (r + 1)])          # its own slice
            assert found['num_rejected'] == int(rejected.sum()) > 0 and found['pool_size'] == 300
    G = tiny_generator()
    features = sampler.PixelFeatures(img_resolution=8, dim=16, seed=2)
    data = sampler.compute_features(features, tiny_data(), batch_size=12, device='cpu')
    z, stats = sampler.select_latents(G, data, pool_size=64, features=features, epsilon=1.1, knn_ignore=5, batch_size=16,
                                      jitter_std=1e-3, generator=torch.Generator().manual_seed(100), device='cpu')
    for result in ranks:
        assert torch.equal(result['z'], z)
        assert result['stats']['pool_seed'] == stats['pool_seed'] and result['stats']['rejected'] == stats['rejected']
