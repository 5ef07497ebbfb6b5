"""Tests for prepare.py and training from a prepared folder (data.py's PreparedFolder): the stored crops and moments,
resuming a killed preparation, torchrun, a run from prepared data equal to one from the raw folder, bad input."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import irepa
import data
import runs
import vae
import prepare
from test_irepa import LATENT, TRAIN, load_last, torchrun


@pytest.fixture
def raw(tmp_path):
    """root/<class>/<image>: 11 images of varied sizes and aspect ratios in 2 classes (so ADM's crop resizes)."""
    rng = np.random.default_rng(0)
    root = tmp_path / 'raw'
    for i in range(11):
        cls = 'cat' if i < 6 else 'dog'
        os.makedirs(root / cls, exist_ok=True)
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f'{i:02d}.png')
    return str(root)


def test_prepared_images_are_imagefolders_crops(raw, tmp_path):
    out = prepare.main(['--data-path', raw, '--out', str(tmp_path / 'p'), '--image-size', '32', '--vae', 'none',
                        '--shard-size', '4', '--num-workers', '0'])
    m = json.load(open(os.path.join(out, 'manifest.json')))
    assert (m['resolution'], m['crop'], m['vae'], m['count'], m['shard_size'], m['complete']) == (
        32, 'adm-center', None, 11, 4, True)
    assert m['class_names'] == ['cat', 'dog'] and m['class_counts'] == [6, 5]
    assert sorted(os.listdir(out)) == ['images-00000.npy', 'images-00001.npy', 'images-00002.npy', 'manifest.json']
    ds, ref = data.PreparedFolder(out, 32, None), data.ImageFolder(raw, 32)
    assert len(ds) == 11 and ds.classes == ref.classes
    for i in range(11):
        (a, la), (b, lb) = ds[i], ref[i]
        assert a.dtype == torch.uint8 and a.shape == (3, 32, 32) and torch.equal(a, b) and la == lb


def test_prepared_moments_are_the_vaes(raw, tmp_path, vae_home, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', vae_home)
    out = prepare.main(['--data-path', raw, '--out', str(tmp_path / 'p'), '--image-size', '32', '--shard-size', '4',
                        '--num-workers', '0', '--batch-size', '3'])
    m = json.load(open(os.path.join(out, 'manifest.json')))
    import vae
    assert m['vae'] == 'sd-vae-ft-mse' and m['latents_scale'] == [0.5, 1.0, 2.0, 4.0]
    assert m['vae_sha256'] == prepare.file_sha256(os.path.join(vae_home, 'hub', 'checkpoints', vae.VAE_FILE))
    ds, ref, sd = data.PreparedFolder(out, 32, 'sd-vae-ft-mse'), data.ImageFolder(raw, 32), vae.SDVAE('cpu')
    for i in (0, 5, 10):
        img, label, moments = ds[i]
        assert torch.equal(img, ref[i][0]) and moments.shape == (8, 4, 4) and moments.dtype == torch.float32
        mean, logvar = sd.vae.encode(img[None].float() / 127.5 - 1)
        torch.testing.assert_close(moments, torch.cat([mean, logvar], 1)[0], atol=1e-5, rtol=1e-5)


def test_a_killed_preparation_continues_and_another_dataset_is_refused(raw, tmp_path, capsys):
    argv = ['--data-path', raw, '--out', str(tmp_path / 'p'), '--image-size', '32', '--vae', 'none',
            '--shard-size', '4', '--num-workers', '0']
    out = prepare.main(argv)
    first = np.load(os.path.join(out, 'images-00000.npy'))
    os.remove(os.path.join(out, 'images-00001.npy'))                           # killed: one shard never renamed,
    open(os.path.join(out, 'images-00002.npy.tmp'), 'wb').write(b'partial')    # another cut short
    with open(os.path.join(out, 'images-00002.npy'), 'r+b') as f:
        f.truncate(100)
    capsys.readouterr()
    prepare.main(argv)
    assert 'rank 0: 2 of 3 shards to write (7 images)' in capsys.readouterr().out
    assert np.array_equal(np.load(os.path.join(out, 'images-00000.npy')), first)
    assert len(data.PreparedFolder(out, 32, None)) == 11
    other = tmp_path / 'other'
    os.makedirs(other / 'x')
    Image.new('RGB', (40, 40)).save(other / 'x' / 'a.png')
    with pytest.raises(SystemExit, match='holds another prepared dataset .*source'):
        prepare.main(['--data-path', str(other)] + argv[2:])


def test_prepare_under_torchrun_writes_the_same_files(raw, tmp_path):
    prepare.main(['--data-path', raw, '--out', str(tmp_path / 'one'), '--image-size', '16', '--vae', 'none',
                  '--shard-size', '3', '--num-workers', '0'])
    r = torchrun('--data-path', raw, '--out', str(tmp_path / 'two'), '--image-size', '16', '--vae', 'none',
                 '--shard-size', '3', '--num-workers', '0', script='prepare.py')
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / 'one')) == sorted(os.listdir(tmp_path / 'two'))
    for name in os.listdir(tmp_path / 'one'):
        if name.endswith('.npy'):
            assert np.array_equal(np.load(tmp_path / 'one' / name), np.load(tmp_path / 'two' / name))


def test_training_from_prepared_images_equals_the_raw_folder(raw, tmp_path):
    """Pixel-space settings read the same uint8 crops: the same run, bit for bit, with flips on."""
    out = prepare.main(['--data-path', raw, '--out', str(tmp_path / 'p'), '--image-size', '16', '--vae', 'none',
                        '--shard-size', '4', '--num-workers', '0'])
    common = TRAIN + ['--encoder', 'hog', '--irepa', '--max-steps', '3', '--hflip=True']
    a = load_last(irepa.main(common + ['--data-path', raw, '--results-dir', str(tmp_path / 'a')]))
    b = load_last(irepa.main(common + ['--data-path', out, '--results-dir', str(tmp_path / 'b')]))
    assert b['args']['class_names'] == ['cat', 'dog'] and b['args']['num_images'] == 11
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


def test_latent_training_from_prepared_moments_equals_the_raw_folder(raw, tmp_path, vae_home, monkeypatch, fp32):
    """The latent step from stored moments runs no VAE and draws the posterior sample with the step's generator:
    the same losses and weights as encoding every batch, to float tolerance; and a resume is exact."""
    monkeypatch.setenv('TORCH_HOME', vae_home)
    out = prepare.main(['--data-path', raw, '--out', str(tmp_path / 'p'), '--image-size', '64', '--shard-size', '4',
                        '--num-workers', '0'])
    common = LATENT + ['--max-steps', '3', '--ckpt-every', '1']
    ra = irepa.main(common + ['--data-path', raw, '--results-dir', str(tmp_path / 'a')])
    monkeypatch.setattr(vae.SDVAE, 'encode', lambda *a: pytest.fail('the VAE encoder ran'))
    rb = irepa.main(common + ['--data-path', out, '--results-dir', str(tmp_path / 'b')])
    a, b = load_last(ra), load_last(rb)
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], atol=1e-5, rtol=1e-4)
    losses = [[line.split(' | ')[1] for line in open(os.path.join(r, 'log.txt')) if line.startswith('step')]
              for r in (ra, rb)]
    assert len(losses[0]) == 3
    for la, lb in zip(*losses):
        assert abs(float(la.split()[1]) - float(lb.split()[1])) < 1e-4
    os.remove(runs.latest_checkpoint(rb))                                      # resume from step 2 to 3
    irepa.main(['--resume', rb, '--max-steps', '3'])
    for k in b['model']:
        assert torch.equal(load_last(rb)['model'][k], b['model'][k]), k


def test_bad_prepared_folders_give_one_line(raw, tmp_path, vae_home, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', vae_home)
    px = prepare.main(['--data-path', raw, '--out', str(tmp_path / 'px'), '--image-size', '16', '--vae', 'none',
                       '--shard-size', '4', '--num-workers', '0'])
    lat = prepare.main(['--data-path', raw, '--out', str(tmp_path / 'lat'), '--image-size', '64', '--shard-size', '4',
                        '--num-workers', '0'])

    def fails(argv, msg):
        with pytest.raises(SystemExit) as e:
            irepa.main(argv + ['--results-dir', str(tmp_path / 'r')])
        assert msg in str(e.value.code) and '\n' not in str(e.value.code), str(e.value.code)

    base = TRAIN + ['--encoder', 'none', '--max-steps', '1']
    fails([*base, '--image-size', '32', '--data-path', px], 'was prepared at 16 px; this run trains at 32 px')
    fails([*base, '--data-path', lat, '--image-size', '64'], "holds sd-vae-ft-mse moments; this run has no VAE")
    fails([*LATENT, '--no-irepa', '--max-steps', '1', '--data-path', px, '--image-size', '16'],
          "has no VAE moments; the latent setting needs them")
    fails([*LATENT, '--max-steps', '1', '--data-path', lat, '--hflip=True'],
          "stored moments are of unflipped images")
    m = json.load(open(os.path.join(px, 'manifest.json')))
    json.dump(dict(m, count=12, class_counts=[6, 6]), open(os.path.join(px, 'manifest.json'), 'w'))
    fails([*base, '--data-path', px], 'images-00002.npy holds uint8 (3, 16, 16, 3), not uint8 (4, 16, 16, 3): its '
                                      'manifest says 12 images')
    json.dump(dict(m, count=12), open(os.path.join(px, 'manifest.json'), 'w'))
    fails([*base, '--data-path', px], 'its manifest says 12 images, its class counts 11')
    json.dump(dict(m, complete=False), open(os.path.join(px, 'manifest.json'), 'w'))
    fails([*base, '--data-path', px], 'is not complete: run prepare.py again')
    for broken in ([], {'format': data.PREPARED_FORMAT}, dict(m, class_counts='6, 5'), dict(m, shard_size=0),
                   dict(m, count=True), dict(m, class_names=[1, 2]), dict(m, class_counts=[-1, 12])):  # not a manifest
        json.dump(broken, open(os.path.join(px, 'manifest.json'), 'w'))
        fails([*base, '--data-path', px], 'manifest.json is not a prepare.py manifest' if broken == [] else
              'manifest.json lacks or garbles ')
    open(os.path.join(px, 'manifest.json'), 'w').write('{"format": "irepa-prepared-v1", "comp')
    fails([*base, '--data-path', px], 'manifest.json is unreadable (JSONDecodeError')
    json.dump(m, open(os.path.join(px, 'manifest.json'), 'w'))
    with open(os.path.join(px, 'images-00001.npy'), 'r+b') as f:
        f.truncate(300)
    os.remove(os.path.join(px, 'images-00002.npy'))
    fails([*base, '--data-path', px], 'images-00001.npy is missing, truncated or unreadable (shorter than its header')
    os.remove(os.path.join(px, 'images-00001.npy'))
    fails([*base, '--data-path', px], 'images-00001.npy is missing, truncated or unreadable ([Errno 2]')
    # what the error says to do: a plain rerun writes the missing shards again
    prepare.main(['--data-path', raw, '--out', px, '--image-size', '16', '--vae', 'none', '--shard-size', '4',
                  '--num-workers', '0'])
    assert len(data.PreparedFolder(px, 16, None)) == 11


def test_prepare_refuses_a_folder_whose_manifest_is_damaged(raw, tmp_path):
    out = str(tmp_path / 'p')
    os.makedirs(out)
    for text, msg in (('{"format": "irepa-prep', 'manifest.json is unreadable (JSONDecodeError'),
                      ('[]', 'manifest.json is not a prepare.py manifest'),
                      ('{"format": "irepa-prepared-v1"}', 'manifest.json lacks or garbles resolution')):
        open(os.path.join(out, 'manifest.json'), 'w').write(text)
        with pytest.raises(SystemExit) as e:
            prepare.main(['--data-path', raw, '--out', out, '--image-size', '16', '--vae', 'none', '--num-workers', '0'])
        assert msg in str(e.value.code) and 'choose an empty folder' in str(e.value.code), e.value.code
        assert '\n' not in str(e.value.code)


@pytest.mark.parametrize('name', ['02.png', '05.png'])                      # inside a class, at its end
def test_an_unreadable_image_is_never_stored_as_another(raw, tmp_path, capsys, name):
    """A corrupt image: its shard is not written and the folder stays incomplete, with one line naming the file (never
    the next image in its slot, as training's ImageFolder would give); once fixed, a rerun writes that shard alone."""
    bad, out = os.path.join(raw, 'cat', name), str(tmp_path / 'p')
    good = open(bad, 'rb').read()
    open(bad, 'wb').write(good[:200])                                           # a PNG cut short
    argv = ['--data-path', raw, '--out', out, '--image-size', '16', '--vae', 'none', '--shard-size', '4',
            '--num-workers', '0']
    with pytest.raises(SystemExit) as e:
        prepare.main(argv)
    msg = str(e.value.code)
    assert f'1 unreadable image(s) ({bad};' in msg and 'their shards were not written' in msg and '\n' not in msg
    assert not os.path.exists(os.path.join(out, 'images-00000.npy' if name == '02.png' else 'images-00001.npy'))
    assert not json.load(open(os.path.join(out, 'manifest.json')))['complete']
    with pytest.raises(ValueError, match='is not complete'):
        data.PreparedFolder(out, 16, None)
    open(bad, 'wb').write(good)
    capsys.readouterr()
    prepare.main(argv)
    assert 'rank 0: 1 of 3 shards to write (4 images)' in capsys.readouterr().out
    ds, ref = data.PreparedFolder(out, 16, None), data.ImageFolder(raw, 16)
    assert all(torch.equal(ds[i][0], ref[i][0]) and ds[i][1] == ref[i][1] for i in range(11))


def test_prepared_folder_checks_every_shards_shape(raw, tmp_path):
    out = prepare.main(['--data-path', raw, '--out', str(tmp_path / 'p'), '--image-size', '16', '--vae', 'none',
                        '--shard-size', '4', '--num-workers', '0'])
    np.save(os.path.join(out, 'images-00002.npy'), np.zeros((2, 16, 16, 3), np.uint8))     # the last holds 3
    with pytest.raises(ValueError, match=r"images-00002.npy holds uint8 \(2, 16, 16, 3\), not uint8 \(3, 16, 16, 3\)"):
        data.PreparedFolder(out, 16, None)


def test_two_ranks_from_prepared_moments_equal_one_process(raw, tmp_path, vae_home, monkeypatch, fp32):
    """Each rank reads its slice of the global batch with its moments and takes its slice of the step's eps."""
    monkeypatch.setenv('TORCH_HOME', vae_home)
    out = prepare.main(['--data-path', raw, '--out', str(tmp_path / 'p'), '--image-size', '64', '--shard-size', '4',
                        '--num-workers', '0'])
    common = LATENT + ['--max-steps', '2', '--data-path', out]
    r = torchrun(*common, '--results-dir', str(tmp_path / 'ddp'))
    assert r.returncode == 0, r.stderr[-3000:]
    one = load_last(irepa.main(common + ['--results-dir', str(tmp_path / 'one')]))
    ddp = load_last(os.path.join(tmp_path, 'ddp', os.listdir(tmp_path / 'ddp')[0]))
    assert ddp['args']['world_size'] == 2
    for k in one['model']:
        torch.testing.assert_close(ddp['model'][k], one['model'][k], atol=1e-5, rtol=1e-4)


def test_prepare_refuses_a_folder_with_files_but_no_manifest(raw, tmp_path):
    """Nothing says what such files are: shards of another dataset would be kept as this one's."""
    black = tmp_path / 'black'                                                 # raw's names, all black
    for cls in ('cat', 'dog'):
        os.makedirs(black / cls)
        for name in os.listdir(os.path.join(raw, cls)):
            Image.new('RGB', (50, 50)).save(black / cls / name)
    out = str(tmp_path / 'p')
    argv = ['--out', out, '--image-size', '16', '--vae', 'none', '--shard-size', '4', '--num-workers', '0']
    prepare.main(['--data-path', raw] + argv)
    os.remove(os.path.join(out, 'manifest.json'))
    with pytest.raises(SystemExit) as e:
        prepare.main(['--data-path', str(black)] + argv)
    msg = str(e.value.code)
    assert 'holds files but no manifest.json' in msg and 'choose an empty folder' in msg and '\n' not in msg
    other = str(tmp_path / 'q')                                                # a kill's leftover is no reason
    os.makedirs(other)
    open(os.path.join(other, 'manifest.json.tmp'), 'wb').write(b'{"form')
    prepare.main(['--data-path', str(black), '--out', other] + argv[2:])
    assert data.PreparedFolder(other, 16, None)[0][0].max() == 0


def test_an_image_edited_in_place_gets_its_shard_written_again(raw, tmp_path, capsys):
    """Same names, new pixels: the manifest stamps each shard with its files' sizes and dates, so a rerun writes the
    shard of an edited image again (and that shard only); a manifest without stamps (an older prepare.py's) keeps its
    shards with a warning and gets the stamps."""
    out = str(tmp_path / 'p')
    argv = ['--data-path', raw, '--out', out, '--image-size', '16', '--vae', 'none', '--shard-size', '4',
            '--num-workers', '0']
    prepare.main(argv)
    Image.new('RGB', (60, 50), (9, 99, 199)).save(os.path.join(raw, 'cat', '05.png'))     # image 5: shard 1
    capsys.readouterr()
    prepare.main(argv)
    said = capsys.readouterr().out
    assert '1 shard(s) were written from images edited since (first: 1)' in said
    assert 'rank 0: 1 of 3 shards to write (4 images)' in said
    ds, ref = data.PreparedFolder(out, 16, None), data.ImageFolder(raw, 16)
    assert ds[5][0][:, 0, 0].tolist() == [9, 99, 199]
    st = os.stat(os.path.join(raw, 'dog', os.listdir(os.path.join(raw, 'dog'))[0]))         # the same bytes, a
    os.utime(os.path.join(raw, 'dog', os.listdir(os.path.join(raw, 'dog'))[0]), ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    capsys.readouterr()                                                                      # new date: redone too
    prepare.main(argv)
    assert '1 shard(s) were written from images edited since' in capsys.readouterr().out
    assert all(torch.equal(ds[i][0], ref[i][0]) for i in range(11))
    m = json.load(open(os.path.join(out, 'manifest.json')))
    del m['shard_stamps']                                                      # as an older prepare.py wrote it
    json.dump(m, open(os.path.join(out, 'manifest.json'), 'w'))
    capsys.readouterr()
    prepare.main(argv)
    out_, err = capsys.readouterr()
    assert "no stamps of its images' sizes and dates, so shards written before are kept" in err
    assert 'rank 0: 0 of 3 shards to write' in out_
    assert json.load(open(os.path.join(out, 'manifest.json')))['shard_stamps'] == data.shard_stamps(ref, 4)
