"""The captured recursion (RecursiveTokenMapper.set_compile) on the CPU with inductor: outputs and
gradients equal eager, one graph per shape that is reused and recompiled where the eager call would
differ, never reaches a pickle or a copy. How much faster it is belongs to `rtm-mapping bench --part
dispatch`, which measures it side by side with the eager call; no test here reads a clock.

Compiling is slow (tens of seconds per graph on a loaded 2-core machine), so the tests share one
small mapper configuration and keep the number of compiled graphs small."""

import copy
import json
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import copy_checkout, run_patch, training_options
from torch._dynamo.utils import counters

from rtm_mapping import core
from rtm_mapping.core import RecursiveTokenMapper

pytestmark = pytest.mark.skipif(not (shutil.which('g++') or shutil.which('clang++')),
                                reason='torch.compile on the CPU (inductor) needs a C++ compiler: install g++ to run these tests')

SMALL = dict(in_features=16, out_features=12, tokens=2, token_dim=8, steps=3, lr_multiplier=0.01)
TOLERANCE = dict(rtol=1e-4, atol=1e-5)   # inductor fuses and reorders float32 sums


def graphs() -> int:
    """Graphs torch._dynamo has compiled in this process so far."""
    return counters['stats']['unique_graphs']


def pair():
    eager = RecursiveTokenMapper(**SMALL)
    captured = copy.deepcopy(eager).set_compile('default')
    return eager, captured


def loss_and_grads(m, z, target, **kwargs):
    m.zero_grad(set_to_none=True)
    w = m(z, **kwargs)
    (w - target).square().mean().backward()
    return w.detach(), {name: p.grad.clone() for name, p in m.named_parameters()}


def test_train_mode_outputs_and_gradients_equal_eager():
    eager, captured = pair()
    z, target = torch.randn(4, 16), torch.randn(4, 12)
    w_eager, g_eager = loss_and_grads(eager.train(), z, target)
    w_captured, g_captured = loss_and_grads(captured.train(), z, target)
    torch.testing.assert_close(w_captured, w_eager, **TOLERANCE)
    assert g_captured.keys() == g_eager.keys()
    for name in g_eager:
        torch.testing.assert_close(g_captured[name], g_eager[name], **TOLERANCE, msg=name)
        assert g_captured[name].abs().sum() > 0, f'{name} gets no gradient through the captured path'


def test_new_batch_size_or_steps_recompile_instead_of_reusing_a_stale_graph():
    eager, captured = pair()
    z, target = torch.randn(2, 16), torch.randn(2, 12)    # the path-length batch (batch_gpu // 2) after batch_gpu = 4
    w_eager, g_eager = loss_and_grads(eager.train(), z, target)
    w_captured, g_captured = loss_and_grads(captured.train(), z, target)
    torch.testing.assert_close(w_captured, w_eager, **TOLERANCE)
    torch.testing.assert_close(g_captured, g_eager, **TOLERANCE)
    eager.eval(), captured.eval()
    with torch.no_grad():
        before = graphs()
        at_h5 = captured(z, steps=5)
        torch.testing.assert_close(at_h5, eager(z, steps=5), **TOLERANCE)
        assert graphs() == before + 1, 'steps=5 must compile a new graph'
        captured.set_steps(steps=5)
        torch.testing.assert_close(captured(z), at_h5, rtol=0, atol=0)     # the H=5 graph again, no new compile
        assert graphs() == before + 1
        with pytest.raises(AssertionError):   # H=5 and H=3 differ: a stale graph would have passed this
            torch.testing.assert_close(at_h5, eager(z, steps=3), **TOLERANCE)


def test_under_ddp_gradients_equal_eager(tmp_path):
    eager, captured = pair()
    z, target = torch.randn(4, 16), torch.randn(4, 12)
    _, g_eager = loss_and_grads(eager.train(), z, target)
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path / "init"}', rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(captured.train(), broadcast_buffers=False)
        for _ in range(2):      # DDP fails on the second iteration if a parameter got no gradient
            _, g_ddp = loss_and_grads(ddp, z, target)
    finally:
        torch.distributed.destroy_process_group()
    for name in g_eager:
        torch.testing.assert_close(g_ddp['module.' + name], g_eager[name], **TOLERANCE, msg=name)


#----------------------------------------------------------------------------
# CUDA graphs: results of a replay live in memory the next replay writes again. core._copied_out makes
# what leaves the captured region a copy; GraphMemory models such a graph on the CPU.

def alias(t):
    """A new tensor on t's memory: what a replayed graph hands out."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


class GraphMemory:
    """RecursiveTokenMapper.recurse as a CUDA graph replays it: every call returns its output in the same buffer,
    every backward returns the gradients in the same buffers."""

    def __init__(self):
        self.out, self.grads = None, None

    def __call__(self, module, z0, *args):
        return _Replay.apply(self, module, args, z0, *module.block.parameters())     # what the graph reads


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, module, args, z0, *params):
        with torch.enable_grad():
            z0_input = z0.detach().requires_grad_(z0.requires_grad)
            out = RecursiveTokenMapper.recurse(module, z0_input, *args)
        ctx.memory, ctx.graph = memory, (out, z0_input, params)
        memory.out = torch.empty_like(out) if memory.out is None else memory.out
        memory.out.copy_(out.detach())
        return alias(memory.out)

    @staticmethod
    def backward(ctx, grad):
        out, z0_input, params = ctx.graph
        grads = torch.autograd.grad(out, (z0_input, *params), grad)
        memory = ctx.memory
        memory.grads = [torch.empty_like(g) for g in grads] if memory.grads is None else memory.grads
        for buffer, g in zip(memory.grads, grads):
            buffer.copy_(g)
        return (None, None, None) + tuple(alias(buffer) for buffer in memory.grads)


def mixing_and_accumulation_grads(m, zs, targets):
    """Two rounds of gradient accumulation; in each, two mapper calls before one backward (style mixing)."""
    m.zero_grad(set_to_none=True)
    for (z1, z2), target in zip(zs, targets):
        w1, w2 = m(z1), m(z2)
        ((w1 - target).square().mean() + (w2 * w1).mean()).backward()
    return {name: p.grad.clone() for name, p in m.named_parameters()}


@pytest.mark.parametrize('copied_out', [True, False])
def test_two_calls_before_a_backward_and_accumulated_rounds_are_safe_from_graph_memory(monkeypatch, copied_out):
    eager = RecursiveTokenMapper(**SMALL).train()
    captured = copy.deepcopy(eager).set_compile('default')
    memory = GraphMemory()
    monkeypatch.setattr(core, 'compiled', lambda function, mode, device_type: core._copied_out(memory) if copied_out else memory)
    zs = [(torch.randn(4, 16), torch.randn(4, 16)) for _ in range(2)]
    targets = [torch.randn(4, 12) for _ in range(2)]
    reference = mixing_and_accumulation_grads(eager, zs, targets)
    grads = mixing_and_accumulation_grads(captured, zs, targets)
    assert memory.out is not None and memory.grads is not None           # the model of graph memory was used
    if copied_out:
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], **TOLERANCE, msg=name)
    else:       # without the copies, the model does corrupt them: the test can fail
        assert not all(torch.allclose(grads[name], reference[name], **TOLERANCE) for name in reference)


def test_captured_graphs_gradients_reach_the_parameters_as_copies(monkeypatch):
    eager, captured = pair()
    seen, copy_gradients = [], core._copy_gradients

    def recording(grad_inputs, grad_outputs):     # the graph's gradients, as the hook receives them
        seen.append({g.data_ptr() for g in grad_inputs if g is not None})
        return copy_gradients(grad_inputs, grad_outputs)
    monkeypatch.setattr(core, '_copy_gradients', recording)
    zs = [(torch.randn(4, 16), torch.randn(4, 16)) for _ in range(2)]
    targets = [torch.randn(4, 12) for _ in range(2)]
    reference = mixing_and_accumulation_grads(eager.train(), zs, targets)
    grads = mixing_and_accumulation_grads(captured.train(), zs, targets)
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], **TOLERANCE, msg=name)
    assert len(seen) == 4                                       # one backward of the graph per call
    block_grads = {p.grad.data_ptr() for p in captured.block.parameters()}
    assert not block_grads & set().union(*seen), 'a .grad is memory of the graph\'s backward'


def test_process_default_reaches_copies_but_not_pickles(monkeypatch):
    monkeypatch.setattr(core, '_compile_default', None)
    captured_calls = []                         # the compile mode of each call that took the captured path
    compiled = core.compiled
    monkeypatch.setattr(core, 'compiled', lambda function, mode, device_type: captured_calls.append(mode) or compiled(function, mode, device_type))
    eager = RecursiveTokenMapper(**SMALL).eval()
    z = torch.randn(4, 16)
    with torch.no_grad():
        reference = eager(z)
        assert captured_calls == []
        core.set_compile_default('default')
        ema = copy.deepcopy(eager)              # G_ema = copy.deepcopy(G)
        torch.testing.assert_close(ema(z), reference, **TOLERANCE)
        assert captured_calls == ['default'], 'the copy did not run the captured path'
        assert '_compile_mode' not in pickle.loads(pickle.dumps(ema)).__dict__
    with pytest.raises(ValueError, match='compile mode'):
        core.set_compile_default('yes')


def test_pickle_of_a_captured_mapper_runs_eager_in_a_fresh_process(tmp_path):
    m = RecursiveTokenMapper(**SMALL).set_compile('default').eval()
    z = torch.randn(4, 16)
    with torch.no_grad():
        w = m(z)
    with open(tmp_path / 'm.pkl', 'wb') as f:
        pickle.dump(m, f)
    torch.save(dict(z=z, w=w), tmp_path / 'ref.pt')
    script = textwrap.dedent('''
        import pickle, torch
        from torch._dynamo.utils import counters
        with open('m.pkl', 'rb') as f:
            m = pickle.load(f)
        ref = torch.load('ref.pt')
        with torch.no_grad():
            w = m(ref['z'])
        assert m._compile_mode is None and counters['stats']['unique_graphs'] == 0
        torch.testing.assert_close(w, ref['w'], rtol=1e-4, atol=1e-5)
        print('ok')
    ''')
    out = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-3000:]


def test_auto_mode_compiles_the_recursion_once_and_reuses_it_at_a_repeated_shape():
    # 'auto' on the CPU: inductor with its C++ wrapper, at batch 1, where `rtm-mapping bench --part dispatch`
    # measures it against the eager call. What does not depend on the machine's load: the same outputs, the
    # whole recursion in one graph (dynamo's caches reset first, so that no earlier test's graph or
    # recompile count is in play), and no recompilation when the call repeats.
    torch._dynamo.reset()
    eager = RecursiveTokenMapper(64, 64, tokens=4, token_dim=16, steps=4, lr_multiplier=0.01).eval()
    captured = copy.deepcopy(eager).set_compile('auto')
    z = torch.randn(1, 64)
    with torch.no_grad():
        before = graphs()
        first = captured(z)
        assert graphs() == before + 1, f'the first call compiled {graphs() - before} graphs, not one'
        torch.testing.assert_close(first, eager(z), **TOLERANCE)
        for _ in range(3):
            torch.testing.assert_close(captured(z), first, rtol=0, atol=0)
        other = torch.randn(1, 64)              # the same shape, other values: the same graph, eager's outputs
        torch.testing.assert_close(captured(other), eager(other), **TOLERANCE)
        assert graphs() == before + 1, 'a repeated call at the same shape recompiled'


#----------------------------------------------------------------------------
# train.py --map-compile: a training argument applied in each training process, never in G_kwargs.

def test_training_loop_wrapper_applies_map_compile_in_its_process(monkeypatch):
    from stylegan2_ada_patch import train_hooks
    monkeypatch.setattr(core, '_compile_default', None)
    seen = {}

    def training_loop(**kwargs):
        seen.update(kwargs, compile_default=core._compile_default)
    wrapped = train_hooks.with_map_compile(training_loop)
    wrapped(map_compile='auto', rank=0, batch_size=4)
    assert seen == dict(rank=0, batch_size=4, compile_default='auto')
    assert core._compile_default is None                    # restored when the loop returns
    wrapped(rank=0)                                         # no --map-compile: eager
    assert seen['compile_default'] is None


def test_train_py_map_compile_is_a_training_option_not_a_network_argument(stylegan_root, tmp_path):
    from stylegan2_ada_patch.dataset import write_dataset
    root = copy_checkout(stylegan_root, tmp_path / 'stylegan2-ada-pytorch')
    write_dataset(str(root / 'data'), count=8, resolution=32)
    assert run_patch(root)[0] == 0

    def dry_run(*args):
        return subprocess.run([sys.executable, 'train.py', '--outdir', str(root / 'runs'), '--data', str(root / 'data'), '--dry-run',
                               '--cfg=cifar', *args], cwd=root, capture_output=True, text=True, timeout=300)
    out = dry_run('--map=rtm', '--map-compile')
    assert out.returncode == 0, out.stderr
    options, _ = training_options(out.stdout)
    assert options['map_compile'] == 'auto'
    assert 'compile' not in json.dumps(options['G_kwargs'])  # G_kwargs go into every pickle
    out = dry_run('--map=rtm', '--map-compile=default')
    assert training_options(out.stdout)[0]['map_compile'] == 'default'
    out = dry_run('--map-compile')
    assert out.returncode == 2 and '--map-compile captures the RTM recursion: it needs --map=rtm.' in out.stdout + out.stderr

#----------------------------------------------------------------------------
# The official loss, as the training loop runs it.

def test_official_loss_phases_with_captured_mapper_equal_eager(stylegan_root):
    from training import networks as official
    from training.loss import StyleGAN2Loss

    from rtm_mapping import networks
    G = networks.Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=8, img_channels=3,
                           mapping_kwargs=dict(steps=2, tokens=2, token_dim=8),
                           synthesis_kwargs=dict(channel_base=64, channel_max=8, num_fp16_res=0, conv_clamp=None))
    D = official.Discriminator(c_dim=0, img_resolution=8, img_channels=3, channel_base=64, channel_max=8,
                               num_fp16_res=0, conv_clamp=None, epilogue_kwargs=dict(mbstd_group_size=2)).requires_grad_(False)
    captured = copy.deepcopy(G)
    captured.mapping.rtm.set_compile('default')
    grads = {}
    for arm, g in [('eager', G), ('captured', captured)]:
        g.train().requires_grad_(True)
        loss = StyleGAN2Loss(device=torch.device('cpu'), G_mapping=g.mapping, G_synthesis=g.synthesis, D=D, style_mixing_prob=0.9, r1_gamma=1)
        torch.manual_seed(7)
        g.zero_grad(set_to_none=True)
        for phase in ('Gmain', 'Greg'):     # batch 4, then the path-length batch 2; style mixing calls the mapper twice
            loss.accumulate_gradients(phase=phase, real_img=None, real_c=None, gen_z=torch.randn(4, 16), gen_c=torch.zeros(4, 0), sync=True, gain=1)
        grads[arm] = {name: p.grad for name, p in g.mapping.named_parameters()}
    torch.testing.assert_close(grads['captured'], grads['eager'], rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads['captured'].values())
    torch.testing.assert_close(captured.mapping.w_avg, G.mapping.w_avg, **TOLERANCE)
    G_ema = copy.deepcopy(captured).eval()        # as the loop makes G_ema: runs, eager
    assert G_ema.mapping.rtm._compile_mode is None and torch.isfinite(G_ema(torch.randn(2, 16), None)).all()
    assert pickle.loads(pickle.dumps(captured)).mapping.rtm._compile_mode is None
