"""A small synthetic image dataset, so that a training run can be seen without any download."""

import colorsys
import json
import os
import zipfile
from io import BytesIO

import click
import numpy as np
import PIL.Image


def class_colour(label: int, num_classes: int) -> np.ndarray:
    """RGB in [0, 1] of a class's blobs: saturated hues evenly spaced around the colour wheel, so that
    every class has its own hue (360 / num_classes degrees apart; by eye, up to about a dozen classes)."""
    return np.asarray(colorsys.hsv_to_rgb(label / num_classes, 1.0, 1.0), np.float32)


def synthetic_images(count: int, resolution: int, num_classes: int = 0, seed: int = 0):
    """Yield (uint8 HWC image, label) pairs: soft blobs on a colour gradient; the class sets the blobs' hue
    (class_colour), the brightness varies within a class."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32) / max(resolution - 1, 1)
    for _ in range(count):
        label = int(rng.randint(num_classes)) if num_classes else None
        base = rng.uniform(0, 1, size=[2, 3]).astype(np.float32)
        img = base[0] * (1 - yy[..., None]) + base[1] * yy[..., None]
        colour = rng.uniform(0, 1, size=3) if label is None else class_colour(label, num_classes) * rng.uniform(0.7, 1.0)
        for _ in range(rng.randint(1, 4)):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.3)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - blob) + np.asarray(colour, np.float32) * blob
        yield np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), label


def write_dataset(dest: str, count: int, resolution: int, num_classes: int = 0, seed: int = 0) -> str:
    """Write images in the layout of the official dataset_tool.py: a folder, or a .zip, of
    00000/img00000000.png ... with dataset.json holding the labels (null when unconditional)."""
    if resolution < 4 or resolution & (resolution - 1):
        raise click.BadParameter('must be a power of two, at least 4', param_hint='--resolution')
    if os.path.exists(dest):
        raise click.ClickException(f'{dest} already exists; choose a new path (nothing was written).')
    files, labels = {}, []
    for idx, (img, label) in enumerate(synthetic_images(count, resolution, num_classes, seed)):
        name = f'{idx // 1000:05d}/img{idx:08d}.png'
        buf = BytesIO()
        PIL.Image.fromarray(img, 'RGB').save(buf, format='png', compress_level=0, optimize=False)
        files[name] = buf.getvalue()
        labels.append([name, label])
    files['dataset.json'] = json.dumps({'labels': labels if num_classes else None}).encode()
    if dest.endswith('.zip'):
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        with zipfile.ZipFile(dest, 'w', compression=zipfile.ZIP_STORED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        for name, data in files.items():
            path = os.path.join(dest, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(data)
    return dest


@click.command()
@click.option('--out', 'dest', help='Output .zip (as dataset_tool.py writes) or folder', required=True, metavar='PATH')
@click.option('--count', help='Number of images', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--resolution', help='Image size in pixels, a power of two', type=click.IntRange(min=4), default=32, show_default=True)
@click.option('--classes', 'num_classes', help='Number of classes, 0 = no labels', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--seed', help='Random seed', type=int, default=0, show_default=True)
def make_dataset(dest, count, resolution, num_classes, seed):
    """Write a small synthetic dataset that train.py --data accepts."""
    write_dataset(dest, count, resolution, num_classes, seed)
    print(f'Wrote {count} images of {resolution}x{resolution} to {dest}')
