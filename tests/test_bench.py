"""`rtm-mapping bench`: the FLOP count against a hand count, the memory and dispatch probes, the kernel
counts against their targets and the documented figures, and the command end to end. Nothing here
asserts a timing: machines are noisy, so the timing targets are printed, not tested."""

import json
import os
import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner

from rtm_mapping import core
from rtm_mapping.bench import gpu_report, mappers, probes, report
from rtm_mapping.bench.parts import PARTS, dispatch, mapper
from rtm_mapping.cli import main
from rtm_mapping.core import RecursiveTokenMapper
from rtm_mapping.mlp import ReferenceMLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Hand counts at z_dim = w_dim = 512, 2 FLOPs per multiply-add.
# MLP: one 512 x 512 matrix per layer.
MLP_LAYER = 2 * 512 * 512                                   # 524,288
# RTM default (4 tokens x 128, SwiGLU expansion 4): token SwiGLU hidden round(2/3 * 4 * 4) = 11,
# channel SwiGLU hidden round(2/3 * 4 * 128) = 341.
TOKEN_MLP = 2 * (4 * 2 * 11 + 11 * 4)                       # per channel: gate_up 4 -> 22, down 11 -> 4
CHANNEL_MLP = 2 * (128 * 2 * 341 + 341 * 128)               # per token: gate_up 128 -> 682, down 341 -> 128
BLOCK = 128 * TOKEN_MLP + 4 * CHANNEL_MLP                   # 1,081,344
RTM_DEFAULT = 2 * MLP_LAYER + 16 * 2 * BLOCK                # lift + readout + H (L + 1) = 32 blocks


def test_flops_of_mlps_match_hand_count():
    assert probes.mapper_flops(ReferenceMLP(512, 512, 2)) == 2 * MLP_LAYER == 1_048_576
    assert probes.mapper_flops(ReferenceMLP(512, 512, 8)) == 8 * MLP_LAYER == 4_194_304


def test_flops_of_default_rtm_match_hand_count():
    rtm = RecursiveTokenMapper(512, 512)
    assert (rtm.steps, rtm.inner_steps) == (16, 1)
    assert probes.mapper_flops(rtm) == RTM_DEFAULT == 35_651_584


def test_flops_follow_steps_and_inner_steps():
    rtm = RecursiveTokenMapper(512, 512)
    rtm.set_steps(steps=8, inner_steps=2)
    assert probes.mapper_flops(rtm) == 2 * MLP_LAYER + 8 * 3 * BLOCK


def test_flops_of_attention_block_match_hand_count():
    # 2 tokens x 8 channels, 1 step: lift 6 -> 16, block twice, readout 16 -> 5. Channel SwiGLU hidden round(2/3 * 2 * 8) = 11.
    rtm = RecursiveTokenMapper(6, 5, tokens=2, token_dim=8, steps=1, block='attention', heads=2, expansion=2.0)
    per_token = 2 * (8 * 24 + 8 * 8 + 8 * 22 + 11 * 8)         # qkv, out, gate_up, down
    attention = 2 * 2 * (2 * 2 * 8)                            # q k^T and a v
    assert probes.mapper_flops(rtm) == 2 * 6 * 16 + 2 * (2 * per_token + attention) + 2 * 16 * 5


def test_reference_mlp_is_the_official_layer_stack():
    # PixelNorm, then equalized-lr linear + lrelu(0.2) * sqrt(2) per layer: check one layer by hand.
    mlp = ReferenceMLP(16, 16, 1)
    z = torch.randn(3, 16)
    layer = mlp.layers[0]
    x = core.pixel_norm(z) @ (layer.weight * layer.weight_gain).t() + layer.bias * layer.bias_gain
    torch.testing.assert_close(mlp(z), torch.nn.functional.leaky_relu(x, 0.2) * 2 ** 0.5)


def test_saved_bytes_counts_a_storage_once_and_skips_parameters():
    w = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(4, 4, requires_grad=True)
    y = x * 2                                   # y is saved by both products below; w is excluded
    assert probes.saved_tensor_bytes(lambda: (y * w).sum() + (y * w).sum(), [w]) == y.numel() * 4


def test_time_interleaved_alternates_order():
    calls = []
    times = probes.time_interleaved({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')},
                                   repeats=3, warmup=1, device=torch.device('cpu'))
    assert calls == ['a', 'b', 'a', 'b', 'b', 'a', 'a', 'b']
    assert set(times) == {'a', 'b'} and all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_paired_overhead_cancels_drifting_load():
    # The machine slows down 10x mid-run; RTM is 1% slower than MLP in every pair.
    times = {'MLP': [1.0, 10.0, 10.0], 'RTM': [1.01, 10.1, 10.1]}
    assert probes.paired_overhead(times, 'RTM', 'MLP') == pytest.approx(0.01)


def test_every_part_has_what_the_command_and_the_reports_call():
    for name, part in PARTS.items():
        assert part.TITLE and part.TARGETS and all(callable(getattr(part, f)) for f in ('measure', 'targets', 'markdown')), name


def _run_quick(tmp_path, *args):
    out = tmp_path / 'bench.json'
    result = CliRunner().invoke(main, ['bench', '--quick', '--out', str(out), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())


def test_bench_quick_without_checkout_writes_json(tmp_path, monkeypatch):
    monkeypatch.delenv('STYLEGAN2_ADA_ROOT', raising=False)
    monkeypatch.delenv('STYLEGAN3_ROOT', raising=False)
    monkeypatch.chdir(tmp_path)                 # not a checkout: generator part skipped
    result, data = _run_quick(tmp_path, '--part', 'mapper', '--part', 'memory', '--part', 'generator')
    assert {'meta', 'mapper', 'memory', 'flops', 'targets', 'ratios', 'notes'} <= set(data)
    assert 'generator' not in data and 'skipped' in data['notes'][0]
    meta = data['meta']
    assert meta['command'].startswith('rtm-mapping bench') and '--quick' in meta['command']
    assert meta['machine']['torch'] == torch.__version__ and meta['device'] == 'cpu'
    assert isinstance(meta['flush_denormal'], bool)
    assert (torch.tensor([1e-40]) * 1.0).item() != 0, 'the command must leave denormals as it found them'
    names = [r['name'] for r in data['mapper']['rows']]
    assert names == ['MLP 2 layers', 'MLP 8 layers'] + [f'RTM H={h}' for h in mapper.SWEEP_H]
    assert data['mapper']['baseline'] == 'rtm_mapping.mlp.ReferenceMLP'
    assert data['flops']['RTM H=16'] == RTM_DEFAULT and data['flops']['MLP 2 layers'] == 2 * MLP_LAYER
    for row in data['mapper']['rows']:
        assert row['forward_ms'] > 0 and row['forward_backward_ms'] > 0 and row['time_per_flop_vs_mlp8'] > 0
    assert [r['name'] for r in data['memory']['rows']] == ['RTM H=1', 'RTM H=16', 'RTM H=16, full backpropagation']
    assert data['memory']['rows'][1]['vs_h1'] == pytest.approx(1.0)
    assert data['memory']['rows'][2]['vs_h1'] > 2
    assert set(data['ratios']) == {t['name'] for t in data['targets']} and len(data['targets']) == 3
    assert '| RTM H=16 (default) |' in result.output and '| target | measured | limit | met |' in result.output


def test_dispatch_counter_separates_views_and_sees_every_op():
    x = torch.randn(4, 6)
    assert probes.count_dispatch(lambda: (x * 2).t().sum()) == dict(ops=3, kernels=2)      # t is a view
    assert probes.count_dispatch(lambda: torch.ops.aten._unsafe_view(x * 2, [24])) == dict(ops=2, kernels=1)   # NO_KERNEL_OPS


def test_rtm_kernel_count_grows_with_block_calls_only():
    # Each extra step adds the same ops (its block calls); nothing else depends on H.
    z = torch.randn(8, 64)
    kernels = {}
    for steps in (1, 2, 3):
        m = mappers.Mapper('RTM', RecursiveTokenMapper(64, 64, tokens=2, token_dim=32, steps=steps), kind='rtm', steps=steps, official=False)
        kernels[steps] = probes.count_dispatch(m.forward(z))['kernels']
    assert kernels[3] - kernels[2] == kernels[2] - kernels[1] > 0


def test_kernel_counts_meet_the_targets_and_are_the_documented_ones(stylegan_root):
    """The mappers as the dispatch part builds and counts them (train.py --cfg=cifar: 8 ws, w_avg tracked; RTM at
    H = 16; batch 64): RTM within its targets, and, with the torch that measured them, every count that README.md
    and docs/performance.md show (docs/bench/cpu-dispatch.json)."""
    documented = report.load(os.path.join(ROOT, 'docs', 'bench', 'cpu-dispatch.json'))
    assert documented['meta']['stylegan'] and documented['dispatch']['steps'] == core.DEFAULTS['steps']
    rows = {row['name']: row for row in documented['dispatch']['rows']}
    built = [mappers.mlp(True, layers, num_ws=dispatch.NUM_WS) for layers in mappers.MLP_LAYERS]
    built.append(mappers.rtm(True, num_ws=dispatch.NUM_WS, name=f'RTM H={core.DEFAULTS["steps"]} eager'))
    z = torch.randn(dispatch.BATCH, mappers.Z_DIM)
    counts = {m.name: dispatch.kernel_counts(m, z) for m in built}
    rtm = counts[built[-1].name]
    assert rtm['no_grad']['kernels'] <= dispatch.TARGETS['kernels_no_grad'].value
    assert rtm['train']['kernels'] <= dispatch.TARGETS['kernels_train'].value
    if torch.__version__ == documented['meta']['machine']['torch']:     # another torch may decompose its ops otherwise
        for name, measured in counts.items():
            assert {key: rows[name][key] for key in ('no_grad', 'train')} == measured, \
                f'{name}: the documented counts are not the code\'s; run `python scripts/figures.py dispatch`'


def test_bench_dispatch_quick_eager_only(tmp_path, monkeypatch):
    monkeypatch.delenv('STYLEGAN2_ADA_ROOT', raising=False)
    monkeypatch.delenv('STYLEGAN3_ROOT', raising=False)
    monkeypatch.chdir(tmp_path)
    result, data = _run_quick(tmp_path, '--part', 'dispatch', '--compile-mode', 'none')
    dispatch = data['dispatch']
    assert dispatch['steps'] == 2 and dispatch['batch'] == 64
    assert [r['name'] for r in dispatch['rows']] == ['MLP 2 layers', 'MLP 8 layers', 'RTM H=2 eager']
    rows = {r['name']: r for r in dispatch['rows']}
    assert rows['MLP 2 layers']['no_grad']['kernels'] < rows['MLP 8 layers']['no_grad']['kernels'] < rows['RTM H=2 eager']['no_grad']['kernels']
    assert all(r['batch1_forward_ms'] > 0 for r in rows.values()) and rows['RTM H=2 eager']['batch1_vs_rtm_eager'] == 1
    kernel_targets = [t for t in data['targets'] if t['unit'] == 'count']
    assert len(kernel_targets) == 2 and all(t['met'] is None for t in kernel_targets)   # H=2: not the target's H
    assert '| RTM H=2 eager |' in result.output


def test_bench_cuda_without_gpu_says_what_to_do(tmp_path):
    if torch.cuda.is_available():
        pytest.skip('a GPU is present')
    result = CliRunner().invoke(main, ['bench', '--quick', '--device', 'cuda', '--out', str(tmp_path / 'b.json')])
    assert result.exit_code != 0 and '--device cpu' in result.output


def test_flops_of_official_and_rtm_mapping_networks(stylegan_root):
    from training import networks as official

    from rtm_mapping import networks
    mlp = official.MappingNetwork(z_dim=512, c_dim=0, w_dim=512, num_ws=None, num_layers=2)
    rtm = networks.MappingNetwork(z_dim=512, c_dim=0, w_dim=512, num_ws=None)
    assert probes.mapper_flops(mlp) == 2 * MLP_LAYER
    assert probes.mapper_flops(rtm) == RTM_DEFAULT


def test_bench_without_stylegan_uses_the_checkout_in_the_current_folder(tmp_path, stylegan_root, monkeypatch):
    monkeypatch.delenv('STYLEGAN2_ADA_ROOT', raising=False)
    monkeypatch.delenv('STYLEGAN3_ROOT', raising=False)
    monkeypatch.chdir(stylegan_root)
    _, data = _run_quick(tmp_path, '--part', 'memory')
    assert data['meta']['stylegan'] == stylegan_root and data['notes'] == []


def test_bench_quick_with_checkout_measures_generators(tmp_path, stylegan_root):
    _, data = _run_quick(tmp_path, '--stylegan', stylegan_root, '--part', 'generator', '--config', 'cifar', '--compile-mode', 'none')
    assert data['meta']['stylegan'] == stylegan_root
    cifar = data['generator']['cifar']
    assert cifar['settings']['shrunk'] and cifar['settings']['num_fp16_res'] == 0
    assert [r['mapper'] for r in cifar['rows']] == ['MLP', 'RTM']
    assert cifar['settings']['steps'] == 2                                      # --quick: H = 2
    assert cifar['rows'][1]['mapper_flops_per_sample'] == 2 * MLP_LAYER + 2 * 2 * BLOCK
    assert all(r['forward_ms_per_image'] > 0 and r['train_step_ms_per_image'] > 0 for r in cifar['rows'])
    overhead = [t for t in data['targets'] if t['name'].startswith('generator forward overhead')]
    assert len(overhead) == 1 and overhead[0]['met'] is None      # shrunk: not at the target's settings
    assert data['flops']['RTM H=16'] == RTM_DEFAULT and data['flops']['MLP 8 layers'] == 8 * MLP_LAYER

#----------------------------------------------------------------------------
# scripts/gpu_bench.sh: its Python pieces on the CPU, and its refusal without CUDA.

def _write_stats(run_dir, sec_per_kimg):
    """A stats.jsonl as train.py writes it: one line per tick, tick 0 first."""
    run_dir.mkdir(parents=True)
    with open(run_dir / 'stats.jsonl', 'w') as f:
        for tick, sec in enumerate(sec_per_kimg):
            f.write(json.dumps({'Progress/tick': {'num': 1, 'mean': tick}, 'Progress/kimg': {'num': 1, 'mean': 4.0 * tick},
                                'Timing/sec_per_tick': {'num': 1, 'mean': 30.0 if tick == 0 else 4 * sec},
                                'Timing/sec_per_kimg': {'num': 1, 'mean': sec}}) + '\n')
    return str(run_dir)


def test_gpu_report_joins_bench_and_training_speed(tmp_path, monkeypatch):
    """A WORKDIR as gpu_bench.sh leaves it: bench-*.json of its bench stages, train-ARM/RUN/stats.jsonl of its train.py stages."""
    monkeypatch.delenv('STYLEGAN2_ADA_ROOT', raising=False)
    monkeypatch.delenv('STYLEGAN3_ROOT', raising=False)
    monkeypatch.chdir(tmp_path)
    work = tmp_path / 'work'
    work.mkdir()
    _run_quick(tmp_path, '--part', 'dispatch', '--compile-mode', 'none')
    (tmp_path / 'bench.json').rename(work / 'bench-dispatch.json')
    _run_quick(tmp_path, '--part', 'memory')
    (tmp_path / 'bench.json').rename(work / 'bench-memory.json')
    _write_stats(work / 'train-mlp' / '00000-cifar', [900.0, 2.0, 2.2, 2.0])
    _write_stats(work / 'train-rtm' / '00000-cifar-rtmH16L1', [900.0, 2.1, 2.1, 2.3])
    _write_stats(work / 'train-rtm-compile' / '00000-cifar-rtmH16L1', [1500.0, 2.04, 2.02, 2.06])
    gpu_report.main([str(work), '', 'smoke=60', 'bench-dispatch=200'])
    data = json.loads((work / 'gpu-bench.json').read_text())
    table = (work / 'gpu-bench.md').read_text()
    training = data['training']
    assert training['mlp']['sec_per_kimg'] == 2.0 and training['mlp']['ticks'] == 3       # tick 0 (start-up) left out
    assert training['rtm']['overhead_vs_mlp'] == pytest.approx(0.05)
    assert training['rtm-compile']['overhead_vs_mlp'] == pytest.approx(0.02) and training['rtm-compile']['tick0_sec'] == 30.0
    assert data['total_seconds'] == 260.0 and data['bench']['dispatch']['steps'] == 2 and 'memory' in data['bench']
    assert '| rtm | 2.100 | +5.00% | 3 |' in table and '| RTM H=2 eager |' in table and '| RTM H=16 |' in table
    assert 'FAILED' not in table

    gpu_report.main([str(work), 'train-rtm-compile', 'train-rtm-compile=9'])
    failed = (work / 'gpu-bench.md').read_text()
    assert 'FAILED stages (see their logs): train-rtm-compile.' in failed and '| rtm-compile |' not in failed
    with pytest.raises(click.ClickException, match='train longer'):
        gpu_report.training_speed(_write_stats(tmp_path / 'short', [900.0]))


def test_gpu_bench_script_stops_at_once_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip('a GPU is present: run scripts/gpu_bench.sh itself')
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    script = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'gpu_bench.sh')
    out = subprocess.run(['bash', script, str(tmp_path), str(tmp_path / 'work')], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and 'torch sees no CUDA device' in out.stderr, out.stderr
    assert os.listdir(tmp_path / 'work') == []        # stopped before copying or running anything
