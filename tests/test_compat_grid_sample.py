"""compat.fix_grid_sample: R1 through ADA's geometric augmentations where torch's grid_sample has no double backward.

What makes the comparison real, in each CI environment (one torch at a time):
- torch.autograd.gradgradcheck: the fix's second derivative against finite differences of its first, float64;
- a reference computed with the native op on a torch that has its double backward (tests/data, written by
  running this file), which the fix must reproduce to float64 rounding on every torch;
- the official R1 phase (StyleGAN2Loss, Dreg, AugmentPipe with every geometric augmentation) with the fix against
  the same phase with a second, independent sampler written here from gathers, which autograd differentiates to
  any order on every torch; and against torch's own op where it has the double backward.

    python tests/test_compat_grid_sample.py      rewrites the reference (needs a torch with the native double backward)
"""

import importlib
import json
import os
import sys

import numpy as np
import pytest
import torch

from stylegan2_ada_patch import compat

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'grid_sample_r1_reference.json')


def native_has_double_backward() -> bool:
    return compat._double_backward_works(compat._grid_sample_native)


def r1_problem():
    """Float64 inputs from numpy's legacy RandomState (the same numbers on every numpy): images, a grid reaching
    past the border (zeros padding), and the weights of a small nonlinear 'discriminator'."""
    rs = np.random.RandomState(0)
    images = torch.from_numpy(rs.randn(2, 3, 5, 5))
    grid = torch.from_numpy(rs.uniform(-1.2, 1.2, size=(2, 4, 4, 2)))
    weights = torch.from_numpy(rs.randn(2, 3, 4, 4))
    return images, grid, weights


def r1_gradients(grid_sample, images, grid, weights):
    """R1 as the official loss takes it, on d(x) = sum(tanh(weights * grid_sample(x))): the penalty ||dd/dx||^2 and its
    gradients with respect to the discriminator's weights and the images."""
    images, weights = images.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    logits = (weights * grid_sample(images, grid)).tanh().sum()
    (grad,) = torch.autograd.grad(logits, images, create_graph=True)
    penalty = grad.square().sum()
    grad_weights, grad_images = torch.autograd.grad(penalty, [weights, images])
    return penalty.detach(), grad_weights, grad_images


def gather_grid_sample(input, grid):
    """Bilinear grid_sample, zeros padding, align_corners=False, from gathers: autograd differentiates it to any order."""
    n, c, h, w = input.shape
    x = ((grid[..., 0] + 1) * w - 1) / 2                    # pixel coordinates, [n, h_out, w_out]
    y = ((grid[..., 1] + 1) * h - 1) / 2
    x0, y0 = x.floor(), y.floor()
    flat = input.reshape(n, c, h * w)
    out = 0
    for xi, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
        for yi, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().reshape(n, 1, -1).expand(n, c, -1)
            out = out + flat.gather(2, index) * (wx * wy * inside).reshape(n, 1, -1)
    return out.reshape(n, c, *grid.shape[1:3])


def write_reference():
    if not native_has_double_backward():
        sys.exit(f'torch {torch.__version__} has no double backward for grid_sample: write the reference on one that has')
    penalty, grad_weights, grad_images = r1_gradients(compat._grid_sample_native, *r1_problem())
    os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
    with open(REFERENCE, 'w') as f:
        json.dump(dict(computed_with=f'torch {torch.__version__}, torch.nn.functional.grid_sample (native double backward), float64',
                       penalty=penalty.item(), grad_weights=grad_weights.flatten().tolist(), grad_images=grad_images.flatten().tolist()), f, indent=0)
        f.write('\n')
    print(f'wrote {REFERENCE}')

#----------------------------------------------------------------------------
# The op.

def test_double_backward_passes_gradgradcheck():
    images, grid, _ = r1_problem()
    images.requires_grad_(True)
    assert torch.autograd.gradcheck(compat.grid_sample, (images, grid))
    assert torch.autograd.gradgradcheck(compat.grid_sample, (images, grid))


def test_equals_the_native_ops_reference_computed_on_a_torch_that_has_its_double_backward():
    with open(REFERENCE) as f:
        reference = json.load(f)
    problem = r1_problem()
    for name, grid_sample in [('fix', compat.grid_sample), ('gathers', gather_grid_sample)] + \
                             ([('native', compat._grid_sample_native)] if native_has_double_backward() else []):
        penalty, grad_weights, grad_images = r1_gradients(grid_sample, *problem)
        assert penalty.item() == pytest.approx(reference['penalty'], rel=1e-12), name
        np.testing.assert_allclose(grad_weights.flatten().numpy(), reference['grad_weights'], rtol=1e-10, atol=1e-13, err_msg=name)
        np.testing.assert_allclose(grad_images.flatten().numpy(), reference['grad_images'], rtol=1e-10, atol=1e-13, err_msg=name)
        assert np.abs(reference['grad_weights']).max() > 1e-2 and np.abs(reference['grad_images']).max() > 1e-2


def test_forward_and_first_backward_are_torchs_own_kernels():
    images, grid, _ = r1_problem()
    images = images.float().requires_grad_(True)
    grid = grid.float()
    out = compat.grid_sample(images, grid)
    assert torch.equal(out, compat._grid_sample_native(images, grid))
    grad_output = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, images, grad_output)
    (theirs,) = torch.autograd.grad(compat._grid_sample_native(images, grid), images, grad_output)
    assert torch.equal(ours, theirs)


def test_a_grid_that_needs_a_gradient_goes_to_torchs_op():
    images, grid, _ = r1_problem()
    grid.requires_grad_(True)
    out = compat.grid_sample(images, grid)
    assert 'GridSampler2DBackward' in type(out.grad_fn).__name__
    torch.autograd.grad(out.sum(), grid)

#----------------------------------------------------------------------------
# The official code.

def test_needed_exactly_where_the_native_op_has_no_double_backward(stylegan_root, monkeypatch, capsys):
    from torch_utils.ops import grid_sample_gradfix
    monkeypatch.setattr(grid_sample_gradfix, 'grid_sample', grid_sample_gradfix.grid_sample)     # both restored after the test
    monkeypatch.setattr(grid_sample_gradfix, 'enabled', False)
    importlib.reload(grid_sample_gradfix)       # the official function, even where an earlier apply() in this session replaced it
    needed = not native_has_double_backward()
    assert compat.fix_grid_sample() is needed
    assert grid_sample_gradfix.enabled is False                     # the probe leaves the official switch as it was
    assert (grid_sample_gradfix.grid_sample is compat.grid_sample) is needed
    assert compat.fix_grid_sample() is False                        # once
    assert compat._double_backward_works(grid_sample_gradfix.grid_sample)
    assert capsys.readouterr().err == ''                            # nor does it print the official fallback warning


def test_stylegan3s_own_op_covers_its_training_loop(stylegan3_root):
    from torch_utils.ops import grid_sample_gradfix
    assert compat.fix_grid_sample() is False
    assert grid_sample_gradfix.grid_sample is not compat.grid_sample


def r1_phase_gradients(grid_sample):
    """The official Dreg phase (R1 on real images) through the augment pipe's geometric augmentations at p = 1 and its
    colour ones, with torch_utils.ops.grid_sample_gradfix.grid_sample = grid_sample: D's gradients, float32."""
    from torch_utils.ops import grid_sample_gradfix
    from training import networks
    from training.augment import AugmentPipe
    from training.loss import StyleGAN2Loss
    torch.manual_seed(1)
    D = networks.Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=256, channel_max=32,
                               num_fp16_res=0, conv_clamp=None, epilogue_kwargs=dict(mbstd_group_size=4))
    augment = AugmentPipe(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
    loss = StyleGAN2Loss(device=torch.device('cpu'), G_mapping=None, G_synthesis=None, D=D, augment_pipe=augment, r1_gamma=10)
    real = torch.randn(4, 3, 16, 16)
    official, grid_sample_gradfix.grid_sample = grid_sample_gradfix.grid_sample, grid_sample
    try:
        loss.accumulate_gradients(phase='Dreg', real_img=real, real_c=torch.zeros(4, 0), gen_z=None, gen_c=None, sync=True, gain=1)
    finally:
        grid_sample_gradfix.grid_sample = official
    return {name: p.grad for name, p in D.named_parameters()}


def test_official_r1_phase_through_ada_equals_an_independent_sampler_and_the_native_op(stylegan_root):
    fixed = r1_phase_gradients(compat.grid_sample)
    references = {'gathers': r1_phase_gradients(gather_grid_sample)}
    if native_has_double_backward():
        references['native'] = r1_phase_gradients(compat._grid_sample_native)
    else:
        with pytest.raises(RuntimeError, match='grid_sampler_2d_backward'):     # what the fix is for
            r1_phase_gradients(compat._grid_sample_native)
    assert fixed.keys() == references['gathers'].keys()
    assert all(g is not None and torch.isfinite(g).all() for g in fixed.values())
    assert all(g.abs().sum() > 0 for name, g in fixed.items() if name.endswith('weight'))     # some biases get exactly 0 from R1
    for name, reference in references.items():
        for param, grad in fixed.items():
            # float32 rounding: the gather sampler blends the same four pixels in another order (measured: up to
            # 1.1e-6 of a tensor's largest gradient); the native op gives the fix's gradients bit for bit.
            torch.testing.assert_close(grad, reference[param], rtol=1e-3, atol=1e-5 * reference[param].abs().max().item(), msg=f'{name}: {param}')


if __name__ == '__main__':
    write_reference()
