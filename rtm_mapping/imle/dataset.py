"""RS-IMLE training images: a folder of images or a dataset_tool.py zip, held in memory as uint8.

IMLE pairs every training image with a latent, so the whole set is in memory, as in RS-IMLE's own
code: uint8 [N, 3, R, R] (CelebA-HQ at 256 px: 5.9 GB; CIFAR-10: 150 MB; a few-shot set: < 80 MB).

What is read, and in which order, follows StyleGAN2-ADA's `ImageFolderDataset`, so a zip written by
`dataset_tool.py` (or `rtm-mapping make-dataset`) and the folder it came from give the same images in the
same order: every file whose extension PIL knows, at any depth, sorted by its path inside the folder or
zip; other files (dataset.json, notes) are ignored, and so are dataset.json's labels (these runs are
unconditional). Grayscale, palette and RGBA images are converted to RGB.

Sizes: every image must be square and all of one size. Images of another size than the decoder's are
resized to it (Lanczos), as RS-IMLE's data loading resizes its folders to 256 px; this is announced. Mixed
sizes and non-square images are refused: cropping and padding are choices the data's owner should make
(dataset_tool.py --transform=center-crop does one).
"""

import io
import json
import os
import zipfile
from typing import Callable, List, Optional

import click
import numpy as np
import PIL.Image
import torch

#----------------------------------------------------------------------------

def dataset_name(path: str) -> str:
    """The name a run directory takes from its data, as StyleGAN's: 'obama' for ~/data/obama.zip or ~/data/obama/."""
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def image_files(path: str) -> List[str]:
    """The image files of a folder or zip, sorted: paths relative to the folder, or names inside the zip."""
    PIL.Image.init()
    if os.path.isdir(path):
        names = [os.path.relpath(os.path.join(root, name), start=path).replace(os.sep, '/')
                 for root, _dirs, files in os.walk(path) for name in files]
    elif os.path.isfile(path) and path.lower().endswith('.zip'):
        try:
            with zipfile.ZipFile(path) as zf:
                names = [name for name in zf.namelist() if not name.endswith('/')]
        except zipfile.BadZipFile as err:
            raise click.ClickException(f'{path}: not a readable zip ({err}); a truncated copy? Write it again '
                                       'with dataset_tool.py or pass the folder of images.') from err
    elif os.path.exists(path):
        raise click.ClickException(f'{path}: training data must be a folder of images or a .zip written by dataset_tool.py.')
    else:
        raise click.ClickException(f'{path}: no such folder or zip.')
    names = sorted(name for name in names if os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION)
    if not names:
        raise click.ClickException(f'{path}: no image files in it (PNG, JPEG, WebP or another format PIL reads, at any depth).')
    return names


def has_labels(path: str, archive: Optional[zipfile.ZipFile] = None) -> bool:
    """Whether the folder or zip has a dataset.json with labels (dataset_tool.py writes "labels": null without)."""
    try:
        if archive is not None:
            text = archive.read('dataset.json') if 'dataset.json' in archive.namelist() else None
        else:
            file = os.path.join(path, 'dataset.json')
            text = None
            if os.path.isfile(file):
                with open(file, 'rb') as f:
                    text = f.read()
        return text is not None and json.loads(text).get('labels') is not None
    except (ValueError, AttributeError):    # not JSON, or not a dict: not dataset_tool.py's file, and not ours to judge
        return False


def load_images(path: str, resolution: int, max_images: Optional[int] = None,
                log: Optional[Callable[[str], None]] = print, progress: bool = False) -> torch.Tensor:
    """Read a folder of images or a dataset_tool.py zip into memory.

    Args:
        path: A folder (searched at any depth) or a .zip.
        resolution: R, the decoder's output size; square images of another size are resized to it.
        max_images: Keep the first N images of the sorted list only; None = all.
        log: Where the one-line notes go (resizing, conversions, ignored labels); None = nowhere.
        progress: Show a progress bar while decoding (tqdm).
    Returns:
        uint8 tensor [N, 3, R, R] (CPU).
    Raises:
        click.ClickException: no images, a file PIL cannot decode (named), mixed sizes, non-square images.
    """
    names = image_files(path)
    if max_images is not None:
        names = names[:max_images]
    archive = zipfile.ZipFile(path) if not os.path.isdir(path) else None

    def read(name):
        if archive is not None:
            return archive.read(name)
        with open(os.path.join(path, name), 'rb') as f:
            return f.read()

    try:
        if log is not None and has_labels(path, archive):
            log(f'{dataset_name(path)}: dataset.json has labels; RS-IMLE training here is unconditional and ignores them.')
        if progress:
            from tqdm import tqdm
            names_iter = tqdm(names, desc='Loading images', unit='img', leave=False, disable=None)
        else:
            names_iter = names
        images, size, converted = [], None, set()
        for name in names_iter:
            data = read(name)
            try:
                image = PIL.Image.open(io.BytesIO(data))
                image.load()
            except (OSError, SyntaxError, ValueError) as err:   # what PIL raises for truncated or foreign bytes
                raise click.ClickException(f'{os.path.join(path, name)}: not a readable image ({err}). Remove or replace it.') from err
            if image.size != (size or image.size):
                raise click.ClickException(f'{path}: images of different sizes ({names[0]} is {size[0]}x{size[1]}, {name} is '
                                           f'{image.size[0]}x{image.size[1]}). Make them one size first '
                                           '(dataset_tool.py --width=R --height=R, or StyleGAN3\'s --resolution=RxR).')
            size = image.size
            if size[0] != size[1]:
                raise click.ClickException(f'{os.path.join(path, name)}: {size[0]}x{size[1]} is not square. Crop the images first '
                                           '(dataset_tool.py --transform=center-crop does).')
            if image.mode != 'RGB':
                converted.add(image.mode)
                image = image.convert('RGB')
            if size[0] != resolution:
                image = image.resize((resolution, resolution), PIL.Image.Resampling.LANCZOS)
            images.append(np.asarray(image, dtype=np.uint8))
    finally:
        if archive is not None:
            archive.close()
    if log is not None:
        if size[0] != resolution:
            log(f'{dataset_name(path)}: resized {len(images)} images from {size[0]}x{size[0]} to {resolution}x{resolution} (Lanczos).')
        if converted:
            log(f'{dataset_name(path)}: converted {", ".join(sorted(converted))} images to RGB.')
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()

#----------------------------------------------------------------------------
