"""data.py: class folders with ADM's crop, the demo's shapes (the prepared format: test_prepare.py)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
from test_irepa import make_folder

def test_center_crop_arr_non_square():
    arr = np.zeros((100, 300, 3), np.uint8)                                # H=100, W=300: thirds R, G, B
    arr[:, :100, 0] = arr[:, 100:200, 1] = arr[:, 200:, 2] = 255
    out = data.center_crop_arr(Image.fromarray(arr), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[:, 8:56, 1].min() == 255 and out[:, 8:56, [0, 2]].max() == 0    # the centre is the green third
    # halving with BOX while the short side >= 2S: 1000x520 -> 500x260 -> 250x130 -> 125x65, then bicubic to 64 high
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (520, 1000, 3), dtype=np.uint8))
    ref = big.resize((500, 260), Image.BOX).resize((250, 130), Image.BOX).resize((125, 65), Image.BOX)
    ref = np.array(ref.resize((round(125 * 64 / 65), 64), Image.BICUBIC))
    left = (ref.shape[1] - 64) // 2
    np.testing.assert_array_equal(data.center_crop_arr(big, 64), ref[:, left:left + 64])

def test_image_folder_labels_and_items(tmp_path):
    ds = data.ImageFolder(make_folder(tmp_path / 'd'), 16)
    assert ds.classes == ['a_cat', 'b_dog'] and len(ds) == 6
    img, label = ds[4]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and label == 1

def test_image_folder_skips_corrupt_image_with_a_warning(tmp_path, capsys):
    root = make_folder(tmp_path / 'd')
    bad = os.path.join(root, 'a_cat', '1.png')
    with open(bad, 'wb') as f:
        f.write(b'not a png')
    ds = data.ImageFolder(root, 16)
    img, label = ds[1]
    err = capsys.readouterr().err                                          # one line, no source line after it
    assert ': warning: skipping unreadable image ' in err and '1.png' in err and err.count('\n') == 1
    torch.testing.assert_close(img, ds[2][0])                              # replaced by the next image
    assert ds.bad == {bad}

@pytest.mark.parametrize('n_bad, tries', [(6, 6), (150, 100)])
def test_image_folder_gives_up_on_a_systematic_failure(tmp_path, capsys, n_bad, tries):
    (tmp_path / 'c').mkdir()
    for i in range(n_bad):
        (tmp_path / 'c' / f'{i:03d}.png').write_bytes(b'not a png')         # e.g. a codec missing for every file
    ds = data.ImageFolder(str(tmp_path), 16)
    with pytest.raises(RuntimeError, match=f'{tries} images in a row are unreadable'):
        ds[0]
    assert capsys.readouterr().err.count('warning: skipping unreadable image') == tries
    assert len(ds.bad) == tries                                            # tried that many, not the whole folder

def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='is not a folder'):
        data.ImageFolder(str(tmp_path / 'missing'), 16)
    (tmp_path / 'empty' / 'cls').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match='no images in'):
        data.ImageFolder(str(tmp_path / 'empty'), 16)

def test_shapes_dataset_is_deterministic_and_labelled():
    ds = data.Shapes(8, 32, seed=1)
    a, la = ds[5]
    b, lb = data.Shapes(8, 32, seed=1)[5]
    assert torch.equal(a, b) and la == lb == 1 and a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert not torch.equal(a, data.Shapes(8, 32, seed=2)[5][0])

def test_image_folder_ignores_hidden_and_empty_folders(tmp_path, capsys):
    for c in ('b', 'a', '.cache', 'empty'):
        (tmp_path / c).mkdir()
    for c in ('a', 'b', '.cache'):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / c / 'x.png')
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'a' / '.hidden.png')
    ds = data.ImageFolder(str(tmp_path), 8)
    err = capsys.readouterr().err
    assert ': warning: ' in err and 'without images are not classes: empty' in err
    assert ds.classes == ['a', 'b'] and len(ds) == 2
