"""How close a swapped generator is to the original: relative w error and image PSNR on fixed seeds (drawn
as generate.py draws them), the floor of a linear least-squares map, and a PNG grid of both. Used by
`rtm-mapping swap` and scripts/swap_*.py."""

from typing import Dict

import numpy as np
import torch

from rtm_mapping import distill

#----------------------------------------------------------------------------

def seed_inputs(G, num_seeds: int):
    """z for seeds 0..num_seeds-1 as generate.py draws them; class seed % c_dim for a conditional model."""
    z = torch.from_numpy(np.stack([np.random.RandomState(seed).randn(G.z_dim) for seed in range(num_seeds)])).float()
    c = torch.zeros([num_seeds, G.c_dim])
    if G.c_dim > 0:
        c[torch.arange(num_seeds), torch.arange(num_seeds) % G.c_dim] = 1
    return z, c


def to_uint8_range(img: torch.Tensor) -> torch.Tensor:
    """generate.py's conversion to [0, 255], without the rounding."""
    return (img * 127.5 + 128).clamp(0, 255)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two [N, C, H, W] batches in [0, 255]."""
    mse = (a - b).square().flatten(1).mean(dim=1).clamp(min=1e-10)
    return 10 * torch.log10(255 ** 2 / mse)


class Evaluator:
    """Relative w error and image PSNR of a student mapper against the teacher's, on fixed seeds.

    Relative w error (centered): distill.relative_error over all seeds (1 = no better than predicting the
    mean w). Uncentered: ||w_student - w_teacher|| / ||w_teacher||, smaller by the share of the mean w in
    ||w_teacher||."""

    def __init__(self, G_teacher, num_seeds: int, batch: int = 16):
        self.G = G_teacher
        self.batch = batch
        self.z, self.c = seed_inputs(G_teacher, num_seeds)
        with torch.no_grad():
            self.w = G_teacher.mapping(self.z, self.c)[:, 0]
            self.images = self.synthesize(self.w)

    def synthesize(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ws = w.unsqueeze(1).repeat([1, self.G.num_ws, 1])
            return torch.cat([to_uint8_range(self.G.synthesis(ws[i:i + self.batch], noise_mode='const'))
                              for i in range(0, len(ws), self.batch)])

    def w_error(self, w: torch.Tensor) -> float:
        return distill.relative_error(w, self.w)

    def figures(self, w: torch.Tensor, images: bool = True) -> Dict:
        out = dict(rel_w_error=self.w_error(w), rel_w_error_uncentered=(w - self.w).norm().item() / self.w.norm().item())
        if images:
            p = psnr(self.synthesize(w), self.images)
            out.update(psnr_median=p.median().item(), psnr_min=p.min().item())
        return out

    def student_w(self, mapping) -> torch.Tensor:
        with torch.no_grad():
            return mapping.rtm(mapping.mapper_input(self.z, self.c))

    def floor_figures(self, mapping, seed: int = 0, images: bool = True) -> Dict:
        """figures() of the linear least-squares floor from the RTM mapping's input to the teacher's w,
        fitted on a stream seeded apart from distill(mapping, ..., seed=seed)'s."""
        sampler = distill.Sampler(self.G.z_dim, self.G.c_dim, seed + 1)
        floor = distill.linear_floor(sampler, lambda z, c: self.G.mapping(z, c)[:, 0], mapping, samples=max(8192, 8 * self.G.z_dim))
        return self.figures(distill.affine(floor, mapping.mapper_input(self.z, self.c)), images=images)


def save_grid(rows, path: str) -> None:
    """PNG grid: one row per [N, C, H, W] batch in [0, 255], images side by side."""
    import PIL.Image
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)     # [C, rows*H, N*W]
    array = grid.round().to(torch.uint8).permute(1, 2, 0).numpy()
    PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, 'L' if array.shape[2] == 1 else 'RGB').save(path)
