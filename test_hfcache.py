"""Tests for hfcache.py and prepare.py --hf-images / --hf-latents: a small copy of the authors' released ImageNet in
its official layout (two Hugging Face datasets saved to disk, both splits, Arrow stream shards, state.json, the Image
struct, the nested-list latents, the singleton form), converted and compared with the download: images bit for bit,
labels, the latent step's z against the official sample_posterior; resuming, ranks, workers; bad caches."""
import io
import json
import os
import re
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image

pa = pytest.importorskip('pyarrow')

import data
import hfcache
import irepa
import prepare
import vae
from test_irepa import LATENT, inputs_settings, load_last, torchrun

S = 64                                     # LATENT's image size: latents 8 x 8
IMAGES, LATENTS = 'imagenet-latents-images', 'imagenet-latents-sdvae-ft-mse-f8d4'


def smooth_images(rng, n, size):
    """Natural-ish crops: bicubic upsampled 8x8 noise (random-noise PNGs would be unrealistically large)."""
    return np.stack([np.array(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (size, size), Image.BICUBIC)) for _ in range(n)])


def png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue()


def official_split(root, rng, labels, names=None, singleton=False, logvar=(-12.0, -4.0), size=S):
    """One split of both datasets under root/<dataset>/; returns what was stored: images (n, S, S, 3) uint8, labels,
    moments (n, 8, S/8, S/8) float32 = cat(mean, std)."""
    n, h = len(labels), size // 8
    images = smooth_images(rng, n, size)
    image_type = pa.struct([('bytes', pa.binary()), ('path', pa.string())])
    column = pa.array([{'bytes': png(a), 'path': f'{i:08d}.png'} for i, a in enumerate(images)], type=image_type)
    label_feature = {'names': names, '_type': 'ClassLabel'} if names else {'dtype': 'int64', '_type': 'Value'}
    hfcache.save_to_disk(os.path.join(root, IMAGES),
                         pa.table({'image': column, 'label': pa.array(labels, pa.int64())}),
                         {'image': {'_type': 'Image'}, 'label': label_feature})
    mean = rng.normal(0, 1, (n, 4, h, h)).astype(np.float32)
    std = torch.exp(0.5 * torch.empty(n, 4, h, h).uniform_(*logvar, generator=torch.Generator().manual_seed(n)))
    moments = np.concatenate([mean, std.numpy()], axis=1)
    value = {'feature': {'dtype': 'float32', '_type': 'Value'}, '_type': 'Sequence'}
    for _ in range(3 if singleton else 2):
        value = {'feature': value, '_type': 'Sequence'}
    rows = moments[:, None] if singleton else moments
    hfcache.save_to_disk(os.path.join(root, LATENTS),
                         pa.table({'id': pa.array(np.arange(n)), 'data': hfcache.nested(rows)}),
                         {'id': {'dtype': 'int64', '_type': 'Value'}, 'data': value})
    return images, np.array(labels), moments


@pytest.fixture
def official(tmp_path):
    """data/ as the official Option A download lays it out: the training split at the top of each dataset folder
    (7 rows in 2 classes with ClassLabel names, [8, h, h] latents), the validation split under val/ (3 rows, plain
    integer labels, the singleton [1, 8, h, h] form)."""
    rng = np.random.default_rng(0)
    root = str(tmp_path / 'data')
    train = official_split(root, rng, [0, 0, 0, 0, 1, 1, 1], names=['n01440764', 'n01443537'])
    val = official_split(os.path.join(root, 'val_tmp'), rng, [0, 1, 1], singleton=True)
    for d in (IMAGES, LATENTS):
        os.rename(os.path.join(root, 'val_tmp', d), os.path.join(root, d, 'val'))
    os.rmdir(os.path.join(root, 'val_tmp'))
    return root, train, val


def convert(tmp_path, *flags, out='p', size=S, shard_size=3, workers=0):
    return prepare.main([*flags, '--out', str(tmp_path / out), '--image-size', str(size),
                         '--shard-size', str(shard_size), '--num-workers', str(workers)])


def option_a(root, split=''):
    return ['--hf-images', os.path.join(root, IMAGES, split), '--hf-latents', os.path.join(root, LATENTS, split)]


def test_option_a_latent_is_the_download(official, tmp_path, vae_home, monkeypatch):
    """Images equal the decoded PNGs bit for bit, labels the dataset's, the mean exactly and the std to the bound;
    the manifest names the source, one latent per image, the official latent statistics."""
    monkeypatch.setenv('TORCH_HOME', vae_home)
    root, (images, labels, moments), (v_images, v_labels, v_moments) = official
    for split, flags, (im, lab, mom), names in [('train', option_a(root), (images, labels, moments),
                                                 ['n01440764', 'n01443537']),
                                                ('val', option_a(root, 'val'), (v_images, v_labels, v_moments),
                                                 ['0', '1'])]:
        out = convert(tmp_path, *flags, out=split)
        m = json.load(open(os.path.join(out, 'manifest.json')))
        assert (m['vae'], m['crop'], m['complete'], m['count'], m['class_names']) == (
            'sd-vae-ft-mse', 'adm-center', True, len(lab), names)
        assert (m['images_from'], m['moments_from'], m['latents_per_image']) == ('hf-arrow-png', 'hf-arrow-mean-std', 1)
        assert m['latents_scale'] == [0.5, 1.0, 2.0, 4.0] and m['vae_sha256'] is None      # no VAE weights read
        assert np.array_equal(np.float32(m['latents_bias']), np.float32([0.1, 0.0, -0.1, 0.2]))
        ds = data.PreparedFolder(out, S, 'sd-vae-ft-mse')
        assert ds.classes == names and len(ds) == len(lab)
        for i in range(len(lab)):
            img, label, mo = ds[i]
            assert torch.equal(img, torch.from_numpy(im[i]).permute(2, 0, 1)) and label == lab[i]
            assert torch.equal(mo[:4], torch.from_numpy(mom[i, :4]))
            std, back = mom[i, 4:].astype(np.float64), torch.exp(0.5 * mo[4:]).double().numpy()
            assert (np.abs(back - std) <= std * 1.02e-6).all()


def test_std_to_logvar_round_trip_is_bounded():
    """Stored as logvar = 2 log std (float64 log, rounded once), exp(0.5 logvar) in float32 gives std back to
    2^-25 |logvar| + 2^-23 relative, at most 1.02e-6 over the VAE's logvar range [-30, 20]: std drawn anywhere in it."""
    std = np.exp(np.random.default_rng(0).uniform(-15, 10, 1_000_000)).astype(np.float32)
    with np.errstate(divide='ignore'):
        logvar = (2 * np.log(std.astype(np.float64))).astype(np.float32)
    back = torch.exp(0.5 * torch.from_numpy(logvar)).double().numpy()
    rel = np.abs(back - std) / std
    assert (rel <= np.abs(logvar) * 2.0 ** -25 + 2.0 ** -23).all() and rel.max() <= 1.02e-6


def test_latent_step_equals_the_official_sample_posterior(official, tmp_path, vae_home, monkeypatch):
    """The step's x from the prepared moments equals official ldm/train.py's sample_posterior on the downloaded
    (mean, std) rows, (mean + std * eps - bias) * scale with the same eps, to 1e-6 relative."""
    monkeypatch.setenv('TORCH_HOME', vae_home)
    root, (images, labels, moments), _ = official
    out = convert(tmp_path, *option_a(root))
    ds = data.PreparedFolder(out, S, 'sd-vae-ft-mse')
    batch = [ds[i] for i in range(len(ds))]
    imgs, ys, mo = (torch.stack([torch.as_tensor(b[j]) for b in batch]) for j in range(3))
    seen = []

    class Recording(vae.SDVAE):
        def sample(self, mean, logvar, noise):
            seen.append(noise)
            return super().sample(mean, logvar, noise)

    sd = Recording('cpu', ds.latent_stats)
    args = inputs_settings(global_batch_size=len(ds), hflip=False, in_channels=4, input_size=S // 8, num_classes=2)
    x = irepa.training_inputs(imgs, ys, 3, args, rank=0, world=1, generator=torch.Generator(), sd_vae=sd,
                              encoder=None, mixed_precision=nullcontext(), moments=mo)[0]
    eps, scale, bias = seen[0], sd.scale, sd.bias
    mean, std = torch.from_numpy(moments).chunk(2, dim=1)
    official_x = (mean + std * eps - bias) * scale                         # official sample_posterior
    rel = (x - official_x).flatten(1).norm(dim=1) / official_x.flatten(1).norm(dim=1)
    assert x.shape == official_x.shape and rel.max() <= 1e-6, rel.max()
    assert not torch.equal(eps, torch.zeros_like(eps))


def test_option_a_pixel_setting(official, tmp_path):
    root, (images, labels, _), _ = official
    out = convert(tmp_path, '--hf-images', os.path.join(root, IMAGES), '--vae', 'none')
    m = json.load(open(os.path.join(out, 'manifest.json')))
    assert (m['vae'], m['moments_from'], m['images_from']) == (None, None, 'hf-arrow-png')
    assert not any(f.startswith('moments') for f in os.listdir(out))
    ds = data.PreparedFolder(out, S, None)
    for i in range(len(labels)):
        assert torch.equal(ds[i][0], torch.from_numpy(images[i]).permute(2, 0, 1)) and ds[i][1] == labels[i]


def class_folder(root, counts, size=80):
    rng = np.random.default_rng(1)
    for c, n in enumerate(counts):
        os.makedirs(os.path.join(root, f'n0{c}'))
        for i in range(n):
            Image.fromarray(smooth_images(rng, 1, size)[0]).save(os.path.join(root, f'n0{c}', f'{i:03d}.JPEG'))
    return root


def test_option_b_own_imagenet_with_official_latents(official, tmp_path, vae_home, monkeypatch):
    """Option B: the folder's ADM crops and class names, the latents' rows paired with the folder's sorted images;
    a count that disagrees is one line naming both; an unreadable image stops the conversion (its latent row is its
    own), one line from a worker process too."""
    monkeypatch.setenv('TORCH_HOME', vae_home)
    root, (_, _, moments), _ = official
    folder = class_folder(str(tmp_path / 'imagenet'), [4, 3])
    out = convert(tmp_path, '--data-path', folder, '--hf-latents', os.path.join(root, LATENTS))
    m = json.load(open(os.path.join(out, 'manifest.json')))
    assert (m['class_names'], m['class_counts'], m['images_from']) == (['n00', 'n01'], [4, 3], 'class-folder')
    ds, ref = data.PreparedFolder(out, S, 'sd-vae-ft-mse'), data.ImageFolder(folder, S)
    for i in range(7):
        assert torch.equal(ds[i][0], ref[i][0]) and ds[i][1] == ref[i][1]
        assert torch.equal(ds[i][2][:4], torch.from_numpy(moments[i, :4]))
    os.utime(os.path.join(folder, 'n00', '001.JPEG'), ns=(1, 10 ** 18))      # edited since: the moments are old
    with pytest.raises(SystemExit, match=r"1 shard\(s\) of --out .* hold images edited since \(first: 0\), and "
                                         r"--hf-latents has the moments of the old ones"):
        convert(tmp_path, '--data-path', folder, '--hf-latents', os.path.join(root, LATENTS))
    os.remove(os.path.join(folder, 'n01', '002.JPEG'))
    with pytest.raises(SystemExit) as e:
        convert(tmp_path, '--data-path', folder, '--hf-latents', os.path.join(root, LATENTS), out='q')
    msg = str(e.value.code)
    assert f"{os.path.join(root, LATENTS)} has 7 rows, {folder} (its images, sorted) 6" in msg and '\n' not in msg
    open(os.path.join(folder, 'n01', '002.JPEG'), 'wb').write(b'not a jpeg')
    with pytest.raises(SystemExit) as e:
        convert(tmp_path, '--data-path', folder, '--hf-latents', os.path.join(root, LATENTS), out='r', workers=2)
    msg = str(e.value.code)
    assert '002.JPEG is unreadable (UnidentifiedImageError' in msg and 'row 6 of the latents is this image' in msg
    assert '\n' not in msg


def test_training_from_the_converted_download(official, tmp_path, vae_home, monkeypatch):
    """End to end: the converted Option A cache trains the latent setting (no VAE encoder runs), and a resume
    finds the same class names."""
    monkeypatch.setenv('TORCH_HOME', vae_home)
    root = official[0]
    out = convert(tmp_path, *option_a(root))
    monkeypatch.setattr(vae.SDVAE, 'encode', lambda *a: pytest.fail('the VAE encoder ran'))
    run = irepa.main(LATENT + ['--max-steps', '2', '--data-path', out, '--results-dir', str(tmp_path / 'r')])
    ck = load_last(run)
    assert ck['args']['class_names'] == ['n01440764', 'n01443537'] and ck['args']['num_images'] == 7
    assert all(torch.isfinite(v).all() for v in ck['model'].values())
    irepa.main(['--resume', run, '--max-steps', '3'])
    assert load_last(run)['step'] == 3


def test_a_killed_conversion_continues_and_another_cache_is_refused(official, tmp_path, vae_home, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv('TORCH_HOME', vae_home)
    root = official[0]
    out = convert(tmp_path, *option_a(root))
    first = np.load(os.path.join(out, 'moments-00000.npy'))
    os.remove(os.path.join(out, 'images-00001.npy'))                       # killed before shard 1 was renamed
    with open(os.path.join(out, 'moments-00002.npy'), 'r+b') as f:          # and during shard 2
        f.truncate(100)
    capsys.readouterr()
    convert(tmp_path, *option_a(root))
    assert 'rank 0: 2 of 3 shards to write (4 images)' in capsys.readouterr().out
    assert np.array_equal(np.load(os.path.join(out, 'moments-00000.npy')), first)
    assert len(data.PreparedFolder(out, S, 'sd-vae-ft-mse')) == 7
    with pytest.raises(SystemExit, match='holds another prepared dataset .*source'):
        convert(tmp_path, *option_a(root, 'val'))


def test_workers_and_ranks_write_the_same_files(official, tmp_path, vae_home, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', vae_home)
    root = official[0]
    one = convert(tmp_path, *option_a(root), out='one')
    two = prepare.main([*option_a(root), '--out', str(tmp_path / 'two'), '--image-size', str(S), '--shard-size', '3',
                        '--num-workers', '2'])
    r = torchrun(*option_a(root), '--out', str(tmp_path / 'ddp'), '--image-size', str(S), '--shard-size', '2',
                 '--num-workers', '0', script='prepare.py')
    assert r.returncode == 0, r.stderr[-3000:]
    for other in (two, str(tmp_path / 'ddp')):
        a, b = data.PreparedFolder(one, S, 'sd-vae-ft-mse'), data.PreparedFolder(other, S, 'sd-vae-ft-mse')
        for i in range(7):
            assert all(torch.equal(torch.as_tensor(u), torch.as_tensor(v)) for u, v in zip(a[i], b[i]))


# -----------------------------------------------------------------------------
# Bad caches: one line each, naming the file

def shard(root, dataset, k=1, split=''):
    return os.path.join(root, dataset, split, f'data-{k:05d}-of-00002.arrow')


def rewrite(path, edit):
    """Rewrites one shard with edit(table) -> table (same stream format); read into memory first."""
    with open(path, 'rb') as f:
        table = pa.ipc.open_stream(f.read()).read_all()
    table = edit(table)
    hfcache.open_stream.cache_clear()
    with pa.OSFile(path, 'wb') as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)


def truncate(path, size):
    """Cuts the file to `size` bytes (negative: that many bytes off its end)."""
    with open(path, 'r+b') as f:
        f.truncate(size if size >= 0 else os.path.getsize(path) + size)


def set_column(name, fn):
    return lambda t: t.set_column(t.column_names.index(name), name, fn(t.column(name)))


def latents_data(fn):
    """Edits the shard's moments as numpy (rows, 8, h, h)."""
    return set_column('data', lambda c: hfcache.nested(fn(hfcache.nested_floats(c, 'test').copy())))


BAD = {
    'missing shard': (lambda r: os.remove(shard(r, LATENTS)), lambda r: shard(r, LATENTS),
                      'is missing (state.json lists it): the download is incomplete'),
    'truncated mid-message': (lambda r: truncate(shard(r, IMAGES), 3000), lambda r: shard(r, IMAGES),
                              'is truncated or not an Arrow stream'),
    'truncated at a message': (lambda r: truncate(shard(r, LATENTS), -len(hfcache.END_OF_STREAM)),
                               lambda r: shard(r, LATENTS), 'is truncated (no end-of-stream marker)'),
    'column missing': (lambda r: rewrite(shard(r, LATENTS), lambda t: t.drop_columns(['id'])),
                       lambda r: shard(r, LATENTS), "has no column 'id' (it has data)"),
    'no state.json': (lambda r: os.remove(os.path.join(r, IMAGES, 'state.json')), lambda r: os.path.join(r, IMAGES),
                      'has no state.json: not a dataset saved by Hugging Face datasets'),
    'lengths differ': (lambda r: rewrite(shard(r, LATENTS), lambda t: t.slice(0, 3)),
                       lambda r: os.path.join(r, LATENTS), 'has 6 rows, '),
    'ids not contiguous': (lambda r: rewrite(shard(r, LATENTS), set_column('id', lambda c: pa.array(np.arange(4) + 4))),
                           lambda r: shard(r, LATENTS), 'row 3 has id 4: the ids are not contiguous'),
    'wrong shape': (lambda r: rewrite(shard(r, LATENTS), latents_data(lambda v: v[:, :, :4])),
                    lambda r: shard(r, LATENTS),
                    "row 3's 'data' is [8, 4, 8], not [8, 8, 8] (or [1, 8, 8, 8]) for 64 px"),
    'non-finite': (lambda r: rewrite(shard(r, LATENTS), latents_data(lambda v: np.where(v == v.max(), np.nan, v))),
                   lambda r: shard(r, LATENTS), 'has a value that is not finite: not the (mean, std)'),
    'negative std': (lambda r: rewrite(shard(r, LATENTS), latents_data(lambda v: v * np.where(
        np.arange(8)[:, None, None] == 6, -1, 1).astype(np.float32))), lambda r: shard(r, LATENTS),
        'row 3 has a negative std (channels 4-7)'),
    'image as binary': (lambda r: rewrite(shard(r, IMAGES, 0), set_column('image', lambda c: c.combine_chunks().field(
        'bytes'))), lambda r: shard(r, IMAGES, 0), "column 'image' is binary, not a struct with binary 'bytes'"),
    'label as string': (lambda r: rewrite(shard(r, IMAGES, 0), set_column('label', lambda c: c.cast(pa.string()))),
                        lambda r: shard(r, IMAGES, 0), "column 'label' is string, not an integer type"),
    'id as string': (lambda r: rewrite(shard(r, LATENTS, 0), set_column('id', lambda c: c.cast(pa.string()))),
                     lambda r: shard(r, LATENTS, 0), "column 'id' is string, not an integer type"),
    'data as float64': (lambda r: rewrite(shard(r, LATENTS, 0), set_column('data', lambda c: c.cast(
        pa.list_(pa.list_(pa.list_(pa.float64())))))), lambda r: shard(r, LATENTS, 0),
        "column 'data' is list<item: list<item: list<item: double>>>, not nested lists of float32"),
    'no rows': (lambda r: [rewrite(shard(r, IMAGES, k), lambda t: t.slice(0, 0)) for k in (0, 1)],
                lambda r: os.path.join(r, IMAGES), 'has no rows'),
    'labels out of order': (lambda r: rewrite(shard(r, IMAGES), set_column('label', lambda c: pa.array([1, 0, 1, 1]))),
                            lambda r: shard(r, IMAGES), 'label 0 after 1 (row 4): the rows are not in ImageFolder'),
}


@pytest.mark.parametrize('edit, msg', [
    (lambda v: v[:2] + [v[2][:4]] + v[3:], " column 'data': row 5 is shaped differently from row 3"),
    (lambda v: v[:2] + [None] + v[3:], " column 'data': row 5 has a missing value"),
    (lambda v: v[:2] + [[[[None] + x[1:] for x in c] for c in v[2]]] + v[3:],
     " column 'data': row 5 has a missing value"),
    (lambda v: [[c[:4] for c in row] for row in v], ": row 3's 'data' is [8, 4, 8], not [8, 8, 8]")],
    ids=['ragged row', 'missing row', 'missing value', 'every row [8, 4, 8]'])
def test_a_bad_row_is_named_in_its_own_file(official, tmp_path, vae_home, monkeypatch, edit, msg):
    """A prepared shard of 7 rows reads both Arrow files (rows 0-2, 3-6): a bad row in the second is named with its
    file and row."""
    monkeypatch.setenv('TORCH_HOME', vae_home)
    root = official[0]
    path = shard(root, LATENTS)
    rewrite(path, set_column('data', lambda c: pa.array(edit(c.to_pylist()), c.type)))
    with pytest.raises(SystemExit) as e:
        convert(tmp_path, *option_a(root), shard_size=7)
    text = str(e.value.code)
    assert path + msg in text and '\n' not in text, text


@pytest.mark.parametrize('case', list(BAD))
def test_bad_caches_give_one_line(official, tmp_path, vae_home, monkeypatch, case):
    monkeypatch.setenv('TORCH_HOME', vae_home)
    root = official[0]
    damage, where, msg = BAD[case]
    damage(root)
    hfcache.open_stream.cache_clear()
    with pytest.raises(SystemExit) as e:
        convert(tmp_path, *option_a(root))
    text = str(e.value.code)
    assert msg in text and where(root) in text and '\n' not in text, text


def test_wrong_image_size_and_flags_give_one_line(official, tmp_path, vae_home, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', vae_home)
    root = official[0]

    def fails(flags, msg, size=S):
        with pytest.raises(SystemExit) as e:
            convert(tmp_path, *flags, size=size)
        assert msg in str(e.value.code) and '\n' not in str(e.value.code), str(e.value.code)

    fails(option_a(root), "row 0's image is 64x64, not 32x32 (--image-size)", size=32)
    fails(['--hf-images', os.path.join(root, IMAGES)], 'needs --hf-latents')
    fails(['--hf-latents', os.path.join(root, LATENTS), '--vae', 'none', '--data-path', str(tmp_path)],
          '--hf-latents with --vae none')
    fails(['--hf-images', os.path.join(root, IMAGES), '--data-path', str(tmp_path)], 'not both')
    fails(['--hf-images', root, '--vae', 'none'], 'has no state.json')


def test_without_pyarrow_one_line_names_the_install(official, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'pyarrow', None)                       # import pyarrow raises ImportError
    with pytest.raises(SystemExit) as e:
        convert(tmp_path, '--hf-images', os.path.join(official[0], IMAGES), '--vae', 'none')
    assert 'needs pyarrow: pip install pyarrow' in str(e.value.code)


def test_a_bad_row_on_one_rank_ends_every_rank_alike(official, tmp_path, vae_home, monkeypatch):
    """Rank 1 alone reads the damaged row (shard 3 of 2-image shards): both ranks end with its one line, none waits."""
    monkeypatch.setenv('TORCH_HOME', vae_home)
    root = official[0]

    def nan_in_last_row(v):
        v[-1, 0, 0, 0] = np.nan
        return v
    rewrite(shard(root, LATENTS), latents_data(nan_in_last_row))
    r = torchrun(*option_a(root), '--out', str(tmp_path / 'ddp'), '--image-size', str(S), '--shard-size', '2',
                 '--num-workers', '0', script='prepare.py')
    lines = [line for line in r.stderr.splitlines() if line.startswith('prepare.py: error: ')]
    assert r.returncode != 0 and len(lines) == 2 and len(set(lines)) == 1, r.stderr[-3000:]
    assert 'row 6 has a value that is not finite' in lines[0]


def test_bench_hf_convert_prints_a_rate(capsys):
    """bench.py --hf-convert builds a synthetic cache in the official layout and converts it in 1 and 2 processes."""
    import bench
    bench.main(['--hf-convert', '12', '--image-size', '16', '--num-workers', '2'])
    out = capsys.readouterr().out
    assert 'hf-convert: 12 rows of 16 px' in out and 'host: ' in out, out
    for workers in (0, 2):
        assert re.search(rf'  {workers} workers: \d+ images/s \(\d+ per process\) \| ImageNet \(1,281,167 rows\): '
                         rf'\d+ core-minutes', out), out
