"""Distil a mapping network into a Recursive Token Mapper: fit RTM(z, c) to a teacher's w(z, c).

Used by `rtm-mapping swap` to give a pretrained generator an RTM mapper without retraining it.
Imports only torch: the teacher is any callable (z, c) -> w and the student is an
rtm_mapping.networks.MappingNetwork (or anything with `.rtm`, a RecursiveTokenMapper, `.mapper_input(z, c)`,
what the RTM receives, and the official `z_dim`/`c_dim` attributes).

What a plain Adam regression misses, and what this module does instead (docs/swap.md has the figures):

1. Initialisation. A randomly initialised RTM is a chaotic map of z: a least-squares readout of its
   final state explains nothing of w (relative error ~1). With the residual branches of the shared
   block zeroed (the down projections of both SwiGLUs, as in ReZero/Fixup), the block is a cascade of
   RMSNorms, a smooth map whose final state keeps most of z; a ridge least-squares readout of it starts
   the student near the linear floor, and Adam then grows the residual branches from zero.
   The lift starts as the teacher's first layer (times lift_gain), not at random: the student then
   starts from the teacher's own first features instead of random projections of z. On the stock
   teachers of docs/swap.md, 16 kimg: 2-layer, random lift 0.589 (worse than the linear floor, 0.513),
   teacher's first layer 0.443; 8-layer, 0.781 against 0.747 (floor 0.755).
2. Optimisation space. Every RTM layer stores weight / lr_multiplier (equalized learning rate; StyleGAN
   uses 0.01 for the mapper), so Adam at a normal rate moves it 100x too slowly. Adam is invariant to
   the scale of the gradient, so dividing the rate by lr_multiplier is exactly Adam on the weights
   the layer uses.
3. Schedule. Linear warm-up, then cosine decay to zero over the sample budget, at a rate of 0.1 on the
   used weights (3x the first version's 3e-2: 0.418 instead of 0.431 relative w error in equal time).
4. Readout. After Adam, the readout is fitted again by least squares on the learned features (the
   optimal readout for them, which Adam only approaches), and kept only if it lowers the error on
   held-out samples: with 4096 samples for 513 unknowns per output the refit can overfit, and on the
   stock 512-wide teacher it did (0.418 -> 0.444), so there the Adam readout is kept.

Measured and not adopted (docs/swap.md): full backpropagation through the recursion (grad_steps = H):
2.5x slower per step and no better in equal time; a w loss weighted by the synthesis network's
affine layers: no better image PSNR.
"""

import copy
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

#----------------------------------------------------------------------------
# Defaults, in one place (the swap command shows them).

DEFAULTS = dict(
    kimg        = 64,       # Thousands of (z, c) samples seen by Adam (a whole swap took 91-147 s on 2 shared CPU cores, H = 16).
    batch       = 64,       # Samples per Adam step.
    lr          = 1e-1,     # Adam rate on the weights the layers use (divided by lr_multiplier for the stored ones).
    grad_steps  = 1,        # Steps differentiated through during distillation (1 = short gradient; the pickle stores 1).
    warmup      = 0.05,     # Fraction of the steps with a linear warm-up.
    init        = 'teacher',  # 'teacher': lift from the teacher's first layer, then as 'zero'; 'zero': zero residual
                              # branches + least-squares readout; 'random': the RTM as constructed.
    lift_gain   = 2.0,      # Scale of the copied first layer (scratch runs, 16 kimg, 2-layer teacher: 1 -> 0.457, 2 -> 0.442, 4 -> 0.439, 8 -> 0.451;
                            # 8-layer teacher: 1 -> 0.742, 2 -> 0.734, 4 -> 0.740; rel. w error, centered).
    lsq_samples = 4096,     # Samples for each least-squares readout fit (before Adam for the 'teacher' and 'zero' inits, and after Adam).
    val_samples = 1024,     # Held-out samples that decide whether the final readout refit is kept.
    ridge       = 1e-4,     # Ridge term of that least-squares fit, relative to the mean feature energy.
)

INITS = ('teacher', 'zero', 'random')

#----------------------------------------------------------------------------
# Figures and fits shared by distill(), `rtm-mapping swap` and scripts/swap_*.py.

def adam_steps(kimg: float, batch: int) -> int:
    """Adam steps for kimg thousand samples in batches of `batch` (at least one)."""
    return max(1, math.ceil(kimg * 1000 / batch))


def relative_error(w: torch.Tensor, target: torch.Tensor) -> float:
    """Centered relative error ||w - target|| / ||target - mean(target)|| over a batch [n, w_dim]:
    0 = exact, 1 = no better than predicting the mean target."""
    return ((w - target).norm() / (target - target.mean(dim=0)).norm()).item()


def affine(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply an affine map [in + 1, out] with the bias in the last row, as ridge_fit() and linear_floor()
    return it, to x [n, in]."""
    return torch.cat([x, torch.ones([x.shape[0], 1], dtype=x.dtype)], dim=1) @ a


class Sampler:
    """Deterministic stream of (z, c) batches: z ~ N(0, I), c one-hot over uniformly drawn classes."""

    def __init__(self, z_dim: int, c_dim: int, seed: int):
        self.z_dim, self.c_dim = z_dim, c_dim
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, n: int):
        z = torch.randn([n, self.z_dim], generator=self.generator)
        c = torch.zeros([n, self.c_dim])
        if self.c_dim > 0:
            c[torch.arange(n), torch.randint(self.c_dim, [n], generator=self.generator)] = 1
        return z, c


def readout_features(rtm, x: torch.Tensor) -> torch.Tensor:
    """The flattened final state Z_H that the RTM readout sees, for input x."""
    features = []
    handle = rtm.readout.register_forward_pre_hook(lambda module, args: features.append(args[0]))
    try:
        rtm(x)
    finally:
        handle.remove()
    return features[0]


def ridge_fit(f: torch.Tensor, w: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge least-squares fit of w [n, out] on features f [n, k] with a bias, in float64; the ridge term is
    relative to the mean feature energy. Returns [k + 1, out], the bias in the last row."""
    f = f.to(torch.float64)
    f = torch.cat([f, torch.ones([f.shape[0], 1], dtype=f.dtype)], dim=1)
    gram = f.T @ f
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, f.T @ w.to(torch.float64))


def least_squares_readout(rtm, x: torch.Tensor, w: torch.Tensor, ridge: float) -> None:
    """Set the RTM readout to the ridge least-squares fit of w on the final state (with bias)."""
    with torch.no_grad():
        a = ridge_fit(readout_features(rtm, x), w, ridge).to(torch.float32)
        rtm.readout.weight.copy_(a[:-1].T / rtm.readout.weight_gain)
        rtm.readout.bias.copy_(a[-1] / rtm.readout.bias_gain)


def first_layer(mapping):
    """The weight [out, in] and bias [out] that the first layer of an official MappingNetwork applies
    (stored tensors times their equalized-learning-rate gains), before its activation."""
    fc = mapping.fc0
    return (fc.weight * fc.weight_gain).detach().float(), (fc.bias * fc.bias_gain).detach().float()


def lift_from_first_layer(rtm, layer, gain: float) -> None:
    """Set the RTM lift to gain * the teacher's first layer. Its input is the same (the normalized z and
    label embedding); where the widths differ, the first min(widths) lift outputs get the teacher's
    features and the rest keep their initialisation."""
    weight, bias = layer
    if weight.shape[1] != rtm.lift.weight.shape[1]:
        raise ValueError(f'the teacher\'s first layer takes {weight.shape[1]} inputs, the RTM lift {rtm.lift.weight.shape[1]}')
    n = min(weight.shape[0], rtm.lift.weight.shape[0])
    with torch.no_grad():
        rtm.lift.weight[:n].copy_(gain * weight[:n] / rtm.lift.weight_gain)
        rtm.lift.bias[:n].copy_(gain * bias[:n] / rtm.lift.bias_gain)


def zero_residual_branches(rtm) -> None:
    """Zero the output projections of every residual branch of the shared block."""
    with torch.no_grad():
        for module in rtm.block.modules():
            if hasattr(module, 'down'):        # SwiGLU
                module.down.weight.zero_()
            elif hasattr(module, 'qkv'):       # AttentionBlock's attention branch
                module.out.weight.zero_()


def linear_floor(sampler: Sampler, teacher: Callable, student, samples: int) -> torch.Tensor:
    """Least-squares affine map from the student's mapper input to w, fitted on `samples` draws: the floor
    that any mapper which only learns the linear part of the teacher reaches. Returns [in + 1, w_dim]
    (apply it with affine())."""
    z, c = sampler(samples)
    with torch.no_grad():
        x = student.mapper_input(z, c).to(torch.float64)
        x = torch.cat([x, torch.ones([x.shape[0], 1], dtype=x.dtype)], dim=1)
        w = teacher(z, c).to(torch.float64)
        return torch.linalg.lstsq(x, w).solution.to(torch.float32)

#----------------------------------------------------------------------------
# The three stages of distill(): initialisation, Adam, final readout refit.

def fit_readout(student, teacher_w: Callable, sampler: Sampler, samples: int, ridge: float) -> None:
    """Set the readout to the ridge least-squares fit of teacher_w on `samples` fresh draws."""
    z, c = sampler(samples)
    with torch.no_grad():
        least_squares_readout(student.rtm, student.mapper_input(z, c), teacher_w(z, c), ridge)


def initialise(student, teacher_w: Callable, sampler: Sampler, init: str, teacher_layer, lift_gain: float,
               lsq_samples: int, ridge: float) -> None:
    """Point 1 of the module docstring: the teacher lift, zero residual branches, a least-squares readout."""
    if init == 'teacher':
        lift_from_first_layer(student.rtm, teacher_layer, lift_gain)
    if init in ('teacher', 'zero'):
        zero_residual_branches(student.rtm)
        fit_readout(student, teacher_w, sampler, lsq_samples, ridge)


def adam(student, teacher_w: Callable, sampler: Sampler, steps: int, batch: int, lr: float, warmup: float, grad_steps: int,
         on_step: Callable[[int, float], None]) -> None:
    """Points 2 and 3 of the module docstring: Adam on the weights the RTM layers use, linear warm-up and
    cosine decay, the mean squared w error as loss. Calls on_step(step, loss) after each step (from 1).
    The RTM's grad_steps and its parameters' requires_grad are restored afterwards."""
    rtm = student.rtm
    lr = lr / rtm.lift.bias_gain        # bias_gain is the lr_multiplier of every RTM layer
    params = list(rtm.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))
    stored_grad_steps = rtm.grad_steps
    rtm.set_steps(grad_steps=grad_steps)
    warmup_steps = max(1, round(warmup * steps))
    try:
        for step in range(steps):
            scale = min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group['lr'] = lr * scale
            z, c = sampler(batch)
            target = teacher_w(z, c)
            with torch.no_grad():
                x = student.mapper_input(z, c)
            loss = (rtm(x) - target).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            on_step(step + 1, loss.item())
    finally:
        for p in params:
            p.requires_grad_(False)
        rtm.set_steps(grad_steps=stored_grad_steps)


def refit_readout(student, teacher_w: Callable, sampler: Sampler, val_samples: int, lsq_samples: int,
                  ridge: float) -> Tuple[float, float]:
    """Point 4 of the module docstring: fit the readout again by least squares on lsq_samples draws, and keep
    the fit only if it lowers the relative error on val_samples held-out draws (drawn first); otherwise the
    readout is restored exactly. Returns the held-out errors (before, after) the refit."""
    rtm = student.rtm
    z, c = sampler(val_samples)
    with torch.no_grad():
        x_val, w_val = student.mapper_input(z, c), teacher_w(z, c)
        before, kept = relative_error(rtm(x_val), w_val), copy.deepcopy(rtm.readout.state_dict())
    fit_readout(student, teacher_w, sampler, lsq_samples, ridge)
    with torch.no_grad():
        after = relative_error(rtm(x_val), w_val)
    if after > before:
        rtm.readout.load_state_dict(kept)
    return before, after

#----------------------------------------------------------------------------

def distill(
    student,
    teacher:     Callable,
    kimg:        float = DEFAULTS['kimg'],
    seed:        int = 0,
    batch:       int = DEFAULTS['batch'],
    lr:          float = DEFAULTS['lr'],
    warmup:      float = DEFAULTS['warmup'],
    init:        str = DEFAULTS['init'],
    teacher_layer: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    lift_gain:   float = DEFAULTS['lift_gain'],
    lsq_samples: int = DEFAULTS['lsq_samples'],
    ridge:       float = DEFAULTS['ridge'],
    grad_steps:  int = DEFAULTS['grad_steps'],
    val_samples: int = DEFAULTS['val_samples'],
    evaluate:    Optional[Callable[[], Dict]] = None,
    eval_every:  int = 0,
    progress:    Optional[Callable[[int, int, float], None]] = None,
) -> List[Dict]:
    """Fit student.rtm so that RTM(student.mapper_input(z, c)) matches teacher(z, c), in place.

    Args:
        student: MappingNetwork with an RTM (`.rtm`) and `.mapper_input(z, c)`; only the RTM is trained
            (the label embedding is kept).
        teacher: (z, c) -> w [batch, w_dim], the original mapper.
        kimg: Thousands of samples for Adam (the least-squares fits come on top).
        seed: Seed of the sample stream; the result is deterministic for a seed.
        teacher_layer: (weight [out, in], bias [out]) of the teacher's first layer, as first_layer()
            returns; needed by init='teacher'.
        batch, lr, warmup, init, lift_gain, lsq_samples, ridge, grad_steps, val_samples: see DEFAULTS. The RTM's own
            grad_steps is restored afterwards.
        evaluate: Optional callable returning a dict of figures; called every eval_every steps.
        progress: Optional callable(step, total_steps, loss).
    Returns:
        History: a list of dicts (step, kimg, loss, and evaluate()'s figures when called); the last one
        has `readout_refit` (whether the final least-squares readout was kept) and `val_error` (relative
        error on the held-out samples, before and after the refit).
    """
    if init not in INITS:
        raise ValueError(f'init must be one of {INITS}, got {init!r}')
    if init == 'teacher' and teacher_layer is None:
        raise ValueError("init='teacher' needs teacher_layer (distill.first_layer(teacher_mapping)); or pass init='zero'")
    sampler = Sampler(student.z_dim, student.c_dim, seed)
    teacher_w = torch.no_grad()(teacher)
    total = adam_steps(kimg, batch)
    recording = evaluate is not None and eval_every > 0
    history = []

    def record(step, loss):
        row = dict(step=step, kimg=step * batch / 1000, loss=loss)
        if recording:
            row.update(evaluate())
        history.append(row)

    def on_step(step, loss):
        if progress is not None:
            progress(step, total, loss)
        if recording and (step % eval_every == 0 or step == total):
            record(step, loss)

    initialise(student, teacher_w, sampler, init, teacher_layer, lift_gain, lsq_samples, ridge)
    if recording:
        record(0, float('nan'))
    adam(student, teacher_w, sampler, total, batch, lr, warmup, grad_steps, on_step)
    before, after = refit_readout(student, teacher_w, sampler, val_samples, lsq_samples, ridge)
    if recording or not history:
        record(total, float('nan'))
    history[-1].update(readout_refit=after <= before, val_error=(before, after))
    return history

#----------------------------------------------------------------------------
