"""`rtm-mapping make-dataset`: a synthetic set that train.py reads, whose classes look different."""

import colorsys
import json
import zipfile

import numpy as np
import pytest

from stylegan2_ada_patch.dataset import synthetic_images, write_dataset


def blob_hue(img):
    """Hue of the most saturated pixel: the centre of a blob, whose colour is the class's."""
    rgb = img.reshape(-1, 3).astype(np.float64) / 255
    saturation = (rgb.max(axis=1) - rgb.min(axis=1)) / np.maximum(rgb.max(axis=1), 1e-6)
    return colorsys.rgb_to_hsv(*rgb[saturation.argmax()])[0]


@pytest.mark.parametrize('num_classes', [4, 10])
def test_the_label_can_be_read_off_the_image(num_classes):
    """Classes k and k + 3 must not share a colour (they did with a 3-colour cycle)."""
    pairs = list(synthetic_images(200, 32, num_classes=num_classes, seed=1))
    hues = np.array([blob_hue(img) for img, _ in pairs])
    labels = np.array([label for _, label in pairs])
    distance = np.abs(hues[:, None] - np.arange(num_classes)[None] / num_classes)
    read = np.minimum(distance, 1 - distance).argmin(axis=1)                   # nearest class hue, around the wheel
    assert set(labels) == set(range(num_classes)) and (read == labels).mean() > 0.95


def test_zip_has_dataset_tool_layout_and_labels(tmp_path):
    path = write_dataset(str(tmp_path / 'data.zip'), count=6, resolution=8, num_classes=3)
    with zipfile.ZipFile(path) as zf:
        labels = json.loads(zf.read('dataset.json'))['labels']
        assert sorted(zf.namelist()) == sorted(['dataset.json'] + [f'00000/img{i:08d}.png' for i in range(6)])
    assert [name for name, _ in labels] == [f'00000/img{i:08d}.png' for i in range(6)] and {label for _, label in labels} <= {0, 1, 2}
