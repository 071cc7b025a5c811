"""rtm_mapping.distill against a pure-torch teacher (no StyleGAN checkout needed)."""

import pytest
import torch
import torch.nn.functional as F

from rtm_mapping import core, distill


def normalize(x):
    return x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()


class Student(torch.nn.Module):
    """The attributes distill() uses of an rtm_mapping.networks.MappingNetwork, unconditional."""

    def __init__(self, dim, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.z_dim, self.c_dim = dim, 0
        self.rtm = core.RecursiveTokenMapper(dim, dim, tokens=4, token_dim=dim // 4, steps=2, lr_multiplier=0.01)

    def mapper_input(self, z, c):
        return normalize(z)


def teacher(dim, seed):
    """A 2-layer StyleGAN-style MLP on the normalized z: lrelu(W2 lrelu(W1 x + b1) + b2), gain sqrt(2)."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = (torch.randn([dim, dim], generator=g) / dim ** 0.5 for _ in range(2))
    b1, b2 = (0.1 * torch.randn([dim], generator=g) for _ in range(2))
    act = lambda x: F.leaky_relu(x, 0.2) * 2 ** 0.5     # noqa: E731

    def w(z, c):
        return act(act(normalize(z) @ w1.T + b1) @ w2.T + b2)
    return w, (w1, b1)


def error(student, teacher_w, seed=123, n=1024):
    z, c = distill.Sampler(student.z_dim, 0, seed)(n)
    with torch.no_grad():
        w = teacher_w(z, c)
        return distill.relative_error(student.rtm(student.mapper_input(z, c)), w)


def test_teacher_init_needs_the_first_layer():
    teacher_w, _ = teacher(32, 0)
    with pytest.raises(ValueError, match='teacher_layer'):
        distill.distill(Student(32, 0), teacher_w, kimg=0.064)


def test_lift_from_first_layer_copies_what_fits():
    rtm = core.RecursiveTokenMapper(16, 8, tokens=4, token_dim=8, lr_multiplier=0.01)     # lift 16 -> 32
    weight, bias = torch.randn([20, 16]), torch.randn([20])
    kept = rtm.lift.weight[20:].clone()
    distill.lift_from_first_layer(rtm, (weight, bias), gain=2.0)
    torch.testing.assert_close(rtm.lift.weight[:20] * rtm.lift.weight_gain, 2 * weight)
    torch.testing.assert_close(rtm.lift.bias[:20] * rtm.lift.bias_gain, 2 * bias)
    assert torch.equal(rtm.lift.weight[20:], kept)
    with pytest.raises(ValueError, match='inputs'):
        distill.lift_from_first_layer(rtm, (torch.randn([20, 15]), bias), gain=1.0)


def test_teacher_lift_beats_the_linear_floor_and_a_random_lift():
    """Regression pin (deterministic): on a 32-wide 2-layer teacher whose first layer is unrelated to the
    student's random draws, the teacher lift lands below the linear least-squares floor and below the
    random lift (measured 0.386 against a floor of 0.450 and 0.499 for the random lift, 8 kimg)."""
    teacher_w, layer = teacher(32, 1000)
    floor = distill.linear_floor(distill.Sampler(32, 0, 7), teacher_w, Student(32, 0), 8192)
    z, c = distill.Sampler(32, 0, 123)(1024)
    floor_error = distill.relative_error(distill.affine(floor, normalize(z)), teacher_w(z, c))
    errors = {}
    for init in ('teacher', 'zero'):
        student = Student(32, 0)
        distill.distill(student, teacher_w, kimg=8, seed=0, lsq_samples=1024, init=init, teacher_layer=layer)
        errors[init] = error(student, teacher_w)
    message = f'floor {floor_error:.3f}, errors {errors}'
    assert errors['teacher'] < floor_error - 0.03, message
    assert errors['teacher'] < errors['zero'] - 0.05, message


@pytest.mark.parametrize('fit_samples', [8, 4096])
def test_readout_refit_is_kept_only_if_it_lowers_the_held_out_error(fit_samples):
    """The final least-squares refit never leaves a readout worse on held-out samples: refitted on 4096
    samples (33 unknowns per output) it is kept; on 8 it overfits and the readout is restored bit for bit."""
    teacher_w, layer = teacher(32, 1000)
    student = Student(32, 0)
    sampler = distill.Sampler(32, 0, 5)
    distill.initialise(student, teacher_w, sampler, 'teacher', layer, lift_gain=2.0, lsq_samples=64, ridge=1e-4)
    readout = {k: v.clone() for k, v in student.rtm.readout.state_dict().items()}
    before_error = error(student, teacher_w)
    before, after = distill.refit_readout(student, teacher_w, sampler, val_samples=1024, lsq_samples=fit_samples, ridge=1e-4)
    kept = all(torch.equal(v, readout[k]) for k, v in student.rtm.readout.state_dict().items())
    if fit_samples == 8:
        assert after > before and kept
        assert error(student, teacher_w) == before_error
    else:
        assert after < before and not kept
        assert error(student, teacher_w) < before_error
