"""rtm_mapping.imle.dataset: folders and dataset_tool.py zips in, uint8 [N, 3, R, R] out, clear errors."""

import os
import zipfile

import click
import numpy as np
import PIL.Image
import pytest
import torch

from rtm_mapping.imle import dataset
from stylegan2_ada_patch.dataset import write_dataset


def test_zip_and_folder_give_the_same_images_in_dataset_tool_order(tmp_path):
    folder = write_dataset(str(tmp_path / 'blobs'), count=5, resolution=16, seed=3)
    archive = write_dataset(str(tmp_path / 'blobs.zip'), count=5, resolution=16, seed=3)
    a = dataset.load_images(folder, 16, log=None)
    b = dataset.load_images(archive, 16, log=None)
    assert a.dtype == torch.uint8 and a.shape == (5, 3, 16, 16)
    assert torch.equal(a, b)
    first = np.array(PIL.Image.open(os.path.join(folder, '00000', 'img00000000.png')))
    assert torch.equal(a[0], torch.from_numpy(first).permute(2, 0, 1))
    assert dataset.dataset_name(archive) == dataset.dataset_name(folder + '/') == 'blobs'
    assert torch.equal(dataset.load_images(archive, 16, max_images=2, log=None), a[:2])


def test_other_sizes_are_resized_and_said_so(tmp_path):
    folder = write_dataset(str(tmp_path / 'big'), count=3, resolution=64)
    notes = []
    images = dataset.load_images(folder, 16, log=notes.append)
    assert images.shape == (3, 3, 16, 16)
    assert notes == ['big: resized 3 images from 64x64 to 16x16 (Lanczos).']
    # A smooth image stays close to its box-filtered reduction.
    reference = torch.nn.functional.avg_pool2d(dataset.load_images(folder, 64, log=None).float(), 4)
    assert (images.float() - reference).abs().mean() < 3


def test_gray_and_rgba_images_become_rgb_and_labels_are_ignored_aloud(tmp_path):
    folder = tmp_path / 'mixed'
    folder.mkdir()
    PIL.Image.new('L', (8, 8), 100).save(folder / 'a.png')
    PIL.Image.new('RGBA', (8, 8), (10, 20, 30, 40)).save(folder / 'b.png')
    (folder / 'dataset.json').write_text('{"labels": [["a.png", 0], ["b.png", 1]]}')
    (folder / 'notes.txt').write_text('not an image')
    notes = []
    images = dataset.load_images(str(folder), 8, log=notes.append)
    assert images.shape == (2, 3, 8, 8)
    assert images[0].unique().tolist() == [100] and images[1, :, 0, 0].tolist() == [10, 20, 30]
    assert any('ignores them' in note for note in notes) and any('converted L, RGBA images to RGB' in note for note in notes)


def _write(folder, sizes):
    folder.mkdir()
    for i, size in enumerate(sizes):
        PIL.Image.new('RGB', size).save(folder / f'{i}.png')
    return str(folder)


def test_bad_data_is_refused_with_what_to_do(tmp_path):
    empty = tmp_path / 'empty'
    (empty / 'sub').mkdir(parents=True)
    (empty / 'sub' / 'readme.txt').write_text('x')
    with pytest.raises(click.ClickException, match='no image files'):
        dataset.load_images(str(empty), 16)
    with pytest.raises(click.ClickException, match='different sizes .*0.png is 16x16, 1.png is 32x32.*dataset_tool.py'):
        dataset.load_images(_write(tmp_path / 'mixed', [(16, 16), (32, 32)]), 16)
    with pytest.raises(click.ClickException, match='not square.*center-crop'):
        dataset.load_images(_write(tmp_path / 'wide', [(32, 16)]), 16)
    corrupt = _write(tmp_path / 'corrupt', [(16, 16), (16, 16)])
    with open(os.path.join(corrupt, '1.png'), 'r+b') as f:
        f.truncate(30)
    with pytest.raises(click.ClickException, match=r'corrupt[/\\]1.png: not a readable image'):
        dataset.load_images(corrupt, 16)
    with pytest.raises(click.ClickException, match='no such folder or zip'):
        dataset.load_images(str(tmp_path / 'missing'), 16)
    (tmp_path / 'data.npz').write_bytes(b'x')
    with pytest.raises(click.ClickException, match='a folder of images or a .zip'):
        dataset.load_images(str(tmp_path / 'data.npz'), 16)
    archive = write_dataset(str(tmp_path / 'cut.zip'), count=4, resolution=16)
    with open(archive, 'r+b') as f:
        f.truncate(os.path.getsize(archive) // 2)
    with pytest.raises(click.ClickException, match='not a readable zip'):
        dataset.load_images(archive, 16)
    with zipfile.ZipFile(tmp_path / 'bad.zip', 'w') as zf:
        zf.writestr('00000/img00000000.png', b'not a png')
    with pytest.raises(click.ClickException, match='img00000000.png: not a readable image'):
        dataset.load_images(str(tmp_path / 'bad.zip'), 16)
