"""data.py: class folders with ADM's crop, the demo's shapes (the prepared format: test_prepare.py)."""
import os
import re

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

def test_16_bit_and_float_images_are_scaled(tmp_path, capsys):
    """PIL's convert('RGB') clips 16-bit grey at 255 (almost white) and truncates floats: grey values above 255 load
    as round(v / 257), floats in [0, 1] times 255, values up to 255 (8-bit data stored wider) as they are; values
    below 0 or above 65535 are unreadable, named in training's warning."""
    g = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    (tmp_path / 'c').mkdir()
    Image.fromarray(g).save(tmp_path / 'c' / 'a_8bit.png')
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / 'c' / 'b_16bit.png')                  # mode I;16
    Image.frombytes('I;16B', (30, 40), (g.astype('>u2') * 257).tobytes()).save(tmp_path / 'c' / 'c_16bitbe.tif')
    Image.fromarray(g.astype(np.int32) * 257).save(tmp_path / 'c' / 'd_16bit_in_I.tif')               # mode I
    Image.fromarray(g.astype(np.float32) / 255).save(tmp_path / 'c' / 'e_float.tif')                   # mode F
    Image.fromarray(g.astype(np.uint16)).save(tmp_path / 'c' / 'f_8bit_in_16.png')                    # I;16, <= 255
    Image.fromarray(np.full((40, 30), 70000, np.int32)).save(tmp_path / 'c' / 'g_32bit.tif')
    Image.fromarray(np.full((40, 30), -1, np.float32)).save(tmp_path / 'c' / 'h_negative.tif')
    ds = data.ImageFolder(str(tmp_path), 16)
    assert [Image.open(p).mode for p, _ in ds.samples] == ['L', 'I;16', 'I;16B', 'I', 'F', 'I;16', 'I', 'F']
    ref = ds.load(ds.samples[0][0])
    assert 40 < ref.float().mean() < 215                                   # a mid-grey image, as are the next five
    for path, _ in ds.samples[1:6]:
        assert torch.equal(ds.load(path), ref), path
    # round(v / 257): 128 -> 0, 129 -> 1, 385 -> 1, 386 -> 2, 65535 -> 255
    v = Image.fromarray(np.array([[0, 128, 129, 385, 386, 65535]], np.uint16))
    assert np.array(data.to_rgb(v))[0, :, 0].tolist() == [0, 0, 1, 1, 2, 255]
    for path, msg in ((ds.samples[6][0], 'a grey image of mode I with values in [70000, 70000]: save it as 8- or'),
                      (ds.samples[7][0], 'a grey image of mode F with values in [-1, -1]')):
        with pytest.raises(ValueError, match=re.escape(msg)):
            ds.load(path)
    img, _ = ds[6]                                                         # training: a warning naming it, skipped
    assert 'g_32bit.tif (ValueError: a grey image of mode I' in capsys.readouterr().err

def test_8_bit_images_load_as_before(tmp_path):
    """Every 8-bit mode still loads as center_crop_arr(im.convert('RGB')), bit for bit."""
    rng = np.random.default_rng(1)
    (tmp_path / 'c').mkdir()
    rgba = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8))
    for mode in ('RGB', 'RGBA', 'L', 'LA', 'P', '1', 'CMYK'):
        (rgba.convert('RGB').quantize(64) if mode == 'P' else rgba.convert(mode)).save(
            tmp_path / 'c' / f'{mode}.{"jpg" if mode == "CMYK" else "png"}')
    ds = data.ImageFolder(str(tmp_path), 16)
    for path, _ in ds.samples:
        with Image.open(path) as im:
            want = data.center_crop_arr(im.convert('RGB'), 16)
        assert torch.equal(ds.load(path), torch.from_numpy(want).permute(2, 0, 1)), path

@pytest.mark.parametrize('link, msg', [('.', r'self is a link to .* or a folder above it'),
                                       ('..', r'self is a link to .* or a folder above it'),
                                       ('a', r'class self is the same folder as class a'),
                                       ('b/sub', r'class self is a folder inside class b'),
                                       ('/', r'self is a link to .* or a folder above it'),
                                       ('../elsewhere', None)])
def test_image_folder_refuses_a_class_linked_to_the_root_or_another_class(tmp_path, link, msg):
    """`ln -s . root/self` would list every image again under a wrong label; two links to one folder, its images
    twice. A link to a folder of its own is a class like any other, even one whose name starts with another's."""
    for c in ('root/a', 'root/a2', 'root/b/sub', 'elsewhere'):
        os.makedirs(tmp_path / c)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / c / 'x.png')
    os.symlink(link, tmp_path / 'root' / 'self')
    if msg is None:
        assert data.ImageFolder(str(tmp_path / 'root'), 8).classes == ['a', 'a2', 'b', 'self']
    else:
        with pytest.raises(FileNotFoundError, match=msg):
            data.ImageFolder(str(tmp_path / 'root'), 8)

def test_a_class_folder_with_its_own_manifest_says_what_to_do(tmp_path, monkeypatch):
    """A folder with a manifest.json is read as prepared: one that is not prepare.py's says to move it away."""
    root = make_folder(tmp_path / 'd')
    (tmp_path / 'd' / 'manifest.json').write_text('{"name": "my dataset"}')
    import irepa
    args = irepa.get_args(['--setting', 'demo', '--data-path', root, '--global-batch-size', '2'])
    with pytest.raises(SystemExit, match='is not a prepare.py manifest .*move it out of a class folder'):
        data.open_dataset(args, None)
