"""The RS-IMLE part of `rtm-mapping bench`: the memory probe against known allocations, the plain product it
compares the search with, and `bench --quick --part imle` end to end (structure and ratios present). Nothing
here asserts a timing."""

import json

import torch
from click.testing import CliRunner

from rtm_mapping.cli import main
from rtm_mapping.imle import bench as imle_bench
from rtm_mapping.imle import networks


def test_live_bytes_follows_allocations_and_frees():
    x = torch.zeros(1000)                               # made before: not counted
    with imle_bench.LiveBytes() as memory:
        a = torch.ones(1000, 250)                       # 1,000,000 bytes
        b = a * 2                                       # 1,000,000 more: peak 2 MB
        del a, b
        c = torch.ones(500, 250)                        # 500,000, after both were freed
        c.add_(1)                                       # in place: nothing new
        v = c.view(-1)                                  # a view: nothing new
        x.add_(1)
    assert memory.peak == 2_000_000 and memory.largest == 1_000_000
    assert memory.live == 500_000                       # c (and its view) still alive
    del c, v
    assert memory.live == 0


def test_plain_product_computes_the_product_whole_or_in_blocks():
    from rtm_mapping.imle import sampler
    x, y = torch.randn(70, 12), torch.randn(300, 12)
    call, what = imle_bench.plain_product(x, y, 1 << 30)
    assert what == '[70, 12] x [12, 300], whole'
    call()
    rb, cb = sampler.search_blocks(70, 300, 12, memory_budget=20_000)
    call, what = imle_bench.plain_product(x, y, 20_000)
    assert f'in blocks of [{rb}, {cb}]' in what and (rb, cb) != (70, 300)
    call()


def test_generator_kwargs_are_the_configs_and_keep_the_mapper_at_reduced_width():
    full = imle_bench.generator_kwargs('cifar10-imle-rtm')
    assert full['decoder'] == 'cifar10' and full['mapper'] == 'rtm' and full['mapper_kwargs']['steps'] == 16
    small = imle_bench.generator_kwargs('cifar10-imle-rtm', width_div=16)
    assert networks.decoder_architecture('cifar10', small['decoder_kwargs'])['width'] == 768 // 16
    assert small['mapper_kwargs'] == full['mapper_kwargs'] and small['z_dim'] == full['z_dim']
    mlp = imle_bench.generator_kwargs('cifar10-imle-mlp')
    assert mlp['mapper'] == 'mlp' and {k: v for k, v in mlp.items() if k != 'mapper' and k != 'mapper_kwargs'} == \
        {k: v for k, v in full.items() if k != 'mapper' and k != 'mapper_kwargs'}


def test_bench_quick_imle_part_reports_times_ratios_and_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('STYLEGAN2_ADA_ROOT', raising=False)
    monkeypatch.delenv('STYLEGAN3_ROOT', raising=False)
    threads = torch.get_num_threads()
    try:        # one thread: a tiny network on a busy 2-core machine runs 10-100x slower on two
        result = CliRunner().invoke(main, ['bench', '--quick', '--part', 'imle', '--imle-decoder', 'cifar10', '--imle-width-div', '64',
                                                  '--imle-search-images', '64', '--threads', '1', '--out', 'b.json'])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / 'b.json').read_text())
    imle = results['imle']
    assert imle['settings']['decoders'] == ['cifar10'] and imle['settings']['repeats'] == imle_bench.RUNS['quick']['repeats']
    (g,) = imle['generator']
    assert g['decoder'] == 'cifar10' and g['batch'] == 64 // 16 and g['width'] == 768 // 64
    assert [r['mapper'] for r in g['rows']] == ['RTM', 'MLP'] and all(r['ms_per_image'] > 0 for r in g['rows'])
    assert g['rows'][0]['steps'] == 16 and g['rows'][1]['mlp_layers'] == 8 and 'rtm_overhead' in g
    s = imle['search']
    assert s['n'] == 64 and s['m'] == 1024 and s['dim'] == 800
    assert s['throughput_vs_product'] > 0 and abs(s['search_over_product'] * s['throughput_vs_product'] - 1) < 1e-9
    assert s['peak_bytes'] >= s['largest_bytes'] > 0 and s['full_matrix_bytes'] == 64 * 1024 * 4
    (target,) = [t for t in results['targets'] if t['name'].startswith('nearest-neighbour search')]
    assert target['met'] is None and target['limit'] == imle_bench.TARGETS['search_over_product'].value       # --quick: not at the target's settings
    assert 'RS-IMLE generators, App. H' in result.output and 'throughput vs product' in result.output
    assert 'mapper' not in results      # only the parts asked for
