"""Tests for experiments/: the CIFAR ResNets of hubconf.py (upstream state-dict format, option-A shortcut, the
encoder's token layout, torch.hub) and the Frechet distance of cifar10.py (closed forms, the `fd` command)."""
import glob
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, 'experiments'))
import cifar10  # noqa: E402
import hubconf  # noqa: E402

SHARED = os.path.join(HERE, '..', 'shared', 'data')


def save_upstream(model, path):
    """A state dict in akamaster's format: saved from DataParallel, hence the 'module.' prefix."""
    torch.save({'state_dict': {'module.' + k: v for k, v in model.state_dict().items()}, 'best_prec1': 0.0}, path)


def random_weights(model, seed=0):
    """Seeded random weights and non-trivial BatchNorm statistics (so a buffer that fails to load would show)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.reset_parameters()
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features))
                m.running_var.copy_(0.5 + torch.rand(m.num_features))
    return model.eval()

# -----------------------------------------------------------------------------
# Frechet distance

def test_fd_closed_form_commuting_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: tr sqrt(S1 S2) = sum sqrt(a b), so
    # FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(0)
    D = 16
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    a, b = rng.uniform(0.1, 3, D), rng.uniform(0.1, 3, D)
    mu1, mu2 = rng.standard_normal(D), rng.standard_normal(D)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for R in (np.eye(D), Q):                                                    # diagonal, then rotated
        S1, S2 = R @ np.diag(a) @ R.T, R @ np.diag(b) @ R.T
        assert cifar10.frechet_distance(mu1, S1, mu2, S2) == pytest.approx(expected, rel=1e-9)
    # scalar covariances: FD = |dmu|^2 + D (s1 - s2)^2
    assert cifar10.frechet_distance(np.zeros(4), 4 * np.eye(4), np.ones(4), np.eye(4)) == pytest.approx(4 + 4 * 1)


def test_fd_closed_form_non_commuting_covariances():
    """Covariances that do not commute, where tr sqrt(S1) sqrt(S2) (a wrong square root) differs from tr sqrt(S1 S2)."""
    # 1-D: FD = (m1 - m2)^2 + (sqrt(s1) - sqrt(s2))^2
    assert cifar10.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1, rel=1e-12)
    # 2-D, a diagonal S1 and a rotated S2: M = S1^(1/2) S2 S1^(1/2) is 2x2 PSD with tr M = tr(S1 S2) and
    # det M = det S1 det S2, and a 2x2 PSD matrix has tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    th = 0.7
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    S1, S2 = np.diag([4.0, 0.25]), R @ np.diag([1.0, 9.0]) @ R.T
    assert np.abs(S1 @ S2 - S2 @ S1).max() > 1                                  # they do not commute
    tr_sqrt = math.sqrt(np.trace(S1 @ S2) + 2 * math.sqrt(np.linalg.det(S1) * np.linalg.det(S2)))
    mu1, mu2 = np.array([0.5, -1.0]), np.array([2.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * tr_sqrt
    assert cifar10.frechet_distance(mu1, S1, mu2, S2) == pytest.approx(expected, rel=1e-10)
    wrong = np.sum((mu1 - mu2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * np.trace(np.diag([2.0, 0.5]) @ R @
                                                                                  np.diag([1.0, 3.0]) @ R.T)
    assert abs(wrong - expected) > 0.4                                          # the test can tell them apart
    # 8-D random pair: S1 S2 is similar to the PSD S1^(1/2) S2 S1^(1/2), so tr sqrt(S1 S2) = sum sqrt(eigenvalues)
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))
    S1, S2 = A @ A.T + 0.1 * np.eye(8), B @ B.T + 0.1 * np.eye(8)
    tr_sqrt = np.sqrt(np.linalg.eigvals(S1 @ S2).real.clip(min=0)).sum()
    assert cifar10.frechet_distance(np.zeros(8), S1, np.zeros(8), S2) == pytest.approx(
        np.trace(S1) + np.trace(S2) - 2 * tr_sqrt, rel=1e-8)


def test_fd_of_a_feature_set_with_itself_is_zero():
    feats = np.random.default_rng(1).standard_normal((500, 64)) @ np.random.default_rng(2).standard_normal((64, 64))
    mu, sigma = cifar10.gaussian_stats(feats)
    assert sigma.shape == (64, 64) and np.allclose(sigma, np.cov(feats.T))
    assert abs(cifar10.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # a shift by d adds exactly |d|^2
    mu2, sigma2 = cifar10.gaussian_stats(feats + 0.5)
    assert cifar10.frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(64 * 0.25, abs=1e-5)

# -----------------------------------------------------------------------------
# The CIFAR ResNets

def test_option_a_shortcut_by_hand():
    block = hubconf.BasicBlock(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    expected = torch.zeros(2, 32, 4, 4)
    for c in range(16):                                                         # input channels land in 8..23
        for i in range(4):
            for j in range(4):
                expected[:, 8 + c, i, j] = x[:, c, 2 * i, 2 * j]
    assert torch.equal(block.shortcut(x), expected)
    # with a zero residual branch the block is ReLU(shortcut)
    block.conv2.weight.data.zero_()
    block.bn2.bias.data.zero_()
    assert torch.equal(block.eval()(x), expected.relu())
    # same width and stride 1: identity, no parameters in the shortcut
    same = hubconf.BasicBlock(16, 16)
    assert torch.equal(same.shortcut(x), x)
    assert sum(p.numel() for p in same.parameters()) == 2 * (16 * 16 * 9 + 2 * 16)


@pytest.mark.parametrize('entry, n, params', [('resnet20_stage3', 3, 269_722), ('resnet56', 9, 853_018)])
def test_loads_upstream_state_dict_by_name(tmp_path, entry, n, params):
    src = random_weights(hubconf.ResNet(n))
    path = str(tmp_path / 'w.th')
    save_upstream(src, path)
    keys = torch.load(path)['state_dict'].keys()
    assert {'module.conv1.weight', 'module.bn1.running_var', 'module.layer1.0.conv1.weight',
            'module.layer3.0.bn2.bias', 'module.linear.weight'} <= set(keys)
    model = getattr(hubconf, entry)(weights=path)
    assert sum(p.numel() for p in model.parameters()) == params                 # akamaster's table: 0.27M / 0.85M
    assert not model.training
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(x), src(x))
    # strict: a missing weight is an error
    bad = {'state_dict': {k: v for k, v in torch.load(path)['state_dict'].items() if 'linear' not in k}}
    torch.save(bad, path)
    with pytest.raises(RuntimeError, match='linear'):
        getattr(hubconf, entry)(weights=path)


@pytest.mark.parametrize('entry, file_name', [('resnet20_stage3', 'resnet20-12fca82f.th'),
                                              ('resnet56', 'resnet56-4bfd9763.th')])
def test_real_weight_files(entry, file_name):
    path = os.path.join(SHARED, file_name)
    if not os.path.isfile(path):
        pytest.skip(f'{path} not present')
    model = getattr(hubconf, entry)(weights=path)
    n = sum(p.numel() for p in model.parameters())
    assert n == {'resnet20_stage3': 269_722, 'resnet56': 853_018}[entry]
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.parametrize('stage, C, h', [(3, 64, 8), (2, 32, 16)])
def test_encoder_tokens_raster_order(stage, C, h):
    enc = random_weights(hubconf.ResNet(3, token_stage=stage))
    assert (enc.embed_dim, enc.patch_size * h, getattr(enc, 'pos_embed', None)) == (C, 32, None)
    x = torch.randn(2, 3, 32, 32)
    tokens = enc.forward_features(x)['x_norm_patchtokens']
    fmap = enc.stages(x)[stage - 1]                                             # (B, C, h, h)
    assert tokens.shape == (2, h * h, C) and fmap.shape == (2, C, h, h)
    for r in range(h):
        for c in range(h):
            assert torch.equal(tokens[:, r * h + c], fmap[:, :, r, c])
    assert (tokens >= 0).all()                                                  # after the last ReLU


def test_torch_hub_load_local(tmp_path, monkeypatch):
    path = str(tmp_path / 'r20.th')
    save_upstream(random_weights(hubconf.ResNet(3)), path)
    monkeypatch.chdir(HERE)
    enc = torch.hub.load('experiments', 'resnet20_stage3', source='local', weights=path)
    assert enc.forward_features(torch.randn(1, 3, 32, 32))['x_norm_patchtokens'].shape == (1, 64, 64)
    enc2 = torch.hub.load('experiments', 'resnet20_stage2', source='local', weights=path)
    assert (enc2.embed_dim, enc2.patch_size) == (32, 2)

# -----------------------------------------------------------------------------
# The `fd` and `check` commands, on tiny data with random-weight networks

@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    """ROOT/{train,test}/<class>/*.png of 32x32 noise; reference / held-out sets shrunk; random-weight ResNets."""
    rng = np.random.default_rng(0)
    for split, n in (('train', 12), ('test', 4)):
        for cls in ('a', 'b'):
            os.makedirs(tmp_path / 'data' / split / cls)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / 'data' / split / cls / f'{i}.png')
    monkeypatch.setattr(cifar10, 'REF_SIZE', 16)
    monkeypatch.setattr(cifar10, 'HELD_OUT', 6)
    monkeypatch.setattr(hubconf, 'load_weights', lambda model, weights, file_name: random_weights(model))
    return tmp_path


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    """Random-weight ResNet-20 and -56 files in akamaster's format, found through $CIFAR_RESNET_DIR (by the hub
    entries that torch.hub imports afresh, where the monkeypatched load_weights does not reach)."""
    wdir = tmp_path / 'weights'
    os.makedirs(wdir)
    for n, name in ((3, 'resnet20-12fca82f.th'), (9, 'resnet56-4bfd9763.th')):
        save_upstream(random_weights(hubconf.ResNet(n)), wdir / name)
    monkeypatch.setenv('CIFAR_RESNET_DIR', str(wdir))
    return wdir


def test_fd_command(tiny_cifar, capsys):
    samples = np.random.default_rng(1).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    np.savez(tiny_cifar / 'samples.npz', arr_0=samples)
    argv = ['--out-dir', str(tiny_cifar / 'out'), 'fd', str(tiny_cifar / 'samples.npz'),
            '--data-path', str(tiny_cifar / 'data')]
    cifar10.main(argv)
    first = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(first) and first > 0
    assert os.path.isfile(tiny_cifar / 'out' / 'ref_stats.npz')
    cifar10.main(argv)                                                          # the cached reference: same FD
    out = capsys.readouterr().out
    assert 'reference:' not in out and float(out.strip().splitlines()[-1]) == first


def test_fd_command_errors(tiny_cifar, capsys):
    data = str(tiny_cifar / 'data')
    np.savez(tiny_cifar / 'float.npz', arr_0=np.zeros((4, 32, 32, 3), np.float32))
    np.savez(tiny_cifar / 'nchw.npz', arr_0=np.zeros((4, 3, 32, 32), np.uint8))
    np.savez(tiny_cifar / 'ok.npz', arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    for file, data_path, msg in ((tiny_cifar / 'missing.npz', data, 'no such file'),
                                 (tiny_cifar / 'float.npz', data, 'expected uint8 (N, 32, 32, 3)'),
                                 (tiny_cifar / 'nchw.npz', data, 'expected uint8 (N, 32, 32, 3)'),
                                 (tiny_cifar / 'ok.npz', str(tiny_cifar / 'nowhere'), 'has no train/ folder')):
        with pytest.raises(SystemExit) as e:
            cifar10.main(['fd', str(file), '--data-path', data_path])
        assert str(e.value).startswith('cifar10.py: error:') and msg in str(e.value) and '\n' not in str(e.value)


def test_check_command(tiny_cifar, capsys):
    cifar10.main(['--out-dir', str(tiny_cifar / 'out'), 'check', '--data-path', str(tiny_cifar / 'data')])
    out = capsys.readouterr().out
    assert 'ResNet-56 test accuracy' in out and 'ResNet-20 test accuracy' in out
    last = out.strip().splitlines()[-1]
    assert last.startswith('FD of 6 held-out train images vs the 16-image reference: ')
    assert float(last.split(': ')[1].split()[0]) >= 0


def test_quick_run_writes_every_output_and_resumes(tiny_cifar, weights_dir, monkeypatch, capsys):
    """`run --quick`: every arm x seed trained by irepa.py, FD along the way, LDS/CDS, the report. The hub encoder
    (a fresh import of hubconf.py through torch.hub) reads random weights from $CIFAR_RESNET_DIR."""
    out = tiny_cifar / 'out'
    argv = ['--out-dir', str(out), 'run', '--data-path', str(tiny_cifar / 'data'), '--quick']
    cifar10.main(argv)
    seeds = cifar10.QUICK['seeds']
    names = ({f'{arm}-s{seed}.json' for arm in cifar10.ARMS for seed in seeds} | {'targets.json'} |
             {f'{arm}-samples.npy' for arm in cifar10.ARMS})
    assert set(os.listdir(out / 'results')) == names
    for arm in cifar10.ARMS:
        assert os.path.isfile(out / f'grid_{arm}.png')
    r = json.load(open(out / 'results' / 'iREPA-ResNet20-s1.json'))
    assert set(r['fd']) == {'2', '4'} and all(np.isfinite(v) for v in r['fd'].values()) and 'lds' in r
    assert r['commit'] == cifar10.git_commit() != 'unknown'
    # each arm trains what its name says: target, projector, spatial norm, seed
    for arm, want in {'iREPA-ResNet20': ('conv', True), 'REPA-ResNet20': ('mlp', False),
                      'conv-only-ResNet20': ('conv', False), 'spnorm-only-ResNet20': ('mlp', True)}.items():
        ck = torch.load(glob.glob(str(out / 'runs' / f'{arm}-s1' / '*' / 'checkpoints' / '0000004.pt'))[0],
                        weights_only=False)
        assert (ck['args']['encoder'], ck['args']['projector'], ck['args']['spatial_norm'], ck['args']['seed'],
                ck['args']['ema_decay']) == ('resnet20_stage3', *want, 1, cifar10.EMA_DECAY)
    report = open(out / 'results.md').read()
    assert '| iREPA-ResNet20 | resnet20_stage3 |' in report and '| resnet20_stage3 |' in report
    fd = {(a, s): json.load(open(out / 'results' / f'{a}-s{s}.json'))['fd']['4'] for a in cifar10.ARMS for s in seeds}
    d = [fd['iREPA-ResNet20', s] - fd['REPA-ResNet20', s] for s in seeds]        # paired, seed by seed
    half = 12.706 * np.std(d, ddof=1) / np.sqrt(2)                               # t(0.975, 1 dof)
    assert (f"| iREPA-ResNet20 − REPA-ResNet20 | {d[0]:+.2f} | {d[1]:+.2f} | {np.mean(d):+.2f} | "
            f"[{np.mean(d) - half:+.2f}, {np.mean(d) + half:+.2f}] |") in report
    assert Image.open(out / 'fd_curve.png').size == (800, 420)
    os.remove(out / 'results.md')
    cifar10.main(['--out-dir', str(out), 'report', '--data-path', str(tiny_cifar / 'data'), '--quick'])   # JSONs only
    assert '14 of 14 runs finished (6 of 6 in the main table)' in open(out / 'results.md').read()
    capsys.readouterr()
    cifar10.main(argv)                                                          # finished pieces are skipped
    assert 'FD' not in capsys.readouterr().out.replace('wrote', '')
    # killed before its first checkpoint: the run folder exists without one; the rerun starts that run afresh
    os.remove(out / 'results' / 'vanilla-s1.json')
    for ck in glob.glob(str(out / 'runs' / 'vanilla-s1' / '*' / 'checkpoints' / '*.pt')):
        os.remove(ck)
    cifar10.main(argv)
    assert set(json.load(open(out / 'results' / 'vanilla-s1.json'))['fd']) == {'2', '4'}
    assert len(glob.glob(str(out / 'runs' / 'vanilla-s1' / '*'))) == 1
    # a run continued under another commit names both
    path = out / 'results' / 'REPA-ResNet20-s1.json'
    r = json.load(open(path))
    del r['lds'], r['fd']['4']
    json.dump(r, open(path, 'w'))
    monkeypatch.setattr(cifar10, 'git_commit', lambda: 'abc1234')
    cifar10.main(argv)
    r2 = json.load(open(path))
    assert r2['commit'] == r['commit'] + '+abc1234' and set(r2['fd']) == {'2', '4'} and 'lds' in r2
    # every FD recorded but no LDS, and the run folder gone (a fresh machine): the last step is redone, FD and LDS
    del r2['lds']
    json.dump(r2, open(path, 'w'))
    shutil.rmtree(out / 'runs' / 'REPA-ResNet20-s1')
    cifar10.main(argv)
    r3 = json.load(open(path))
    assert r3['fd']['4'] == pytest.approx(r2['fd']['4'], rel=1e-3) and 'lds' in r3    # the same run again


def test_prep_writes_class_folders_from_the_official_python_archive(tmp_path, capsys):
    import io
    import pickle
    import tarfile
    rng = np.random.default_rng(0)
    batches = {f'data_batch_{i}': 3 for i in range(1, 6)} | {'test_batch': 4}
    arrays = {name: rng.integers(0, 256, (n, 3072), dtype=np.uint8) for name, n in batches.items()}
    with tarfile.open(tmp_path / 'cifar-10-python.tar.gz', 'w:gz') as tar:
        def add(name, obj):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add('batches.meta', {b'label_names': [b'cat', b'dog']})
        for name, a in arrays.items():
            add(name, {b'data': a, b'labels': [k % 2 for k in range(len(a))]})
    cifar10.main(['prep', str(tmp_path / 'cifar-10-python.tar.gz'), str(tmp_path / 'root')])
    assert 'wrote 15 train images' in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / 'root' / 'train')) == ['cat', 'dog']
    assert len(os.listdir(tmp_path / 'root' / 'train' / 'cat')) == 10                  # labels 0, 1, 0 per batch
    assert len(os.listdir(tmp_path / 'root' / 'test' / 'dog')) == 2
    img = np.array(Image.open(tmp_path / 'root' / 'test' / 'dog' / '00001.png'))   # the test batch's 2nd image
    np.testing.assert_array_equal(img, arrays['test_batch'][1].reshape(3, 32, 32).transpose(1, 2, 0))   # CHW rows
    with tarfile.open(tmp_path / 'evil.tar.gz', 'w:gz') as tar:              # a pickle may name any function
        data = pickle.dumps({b'label_names': os.system}, protocol=2)            # unpickled, it would be callable
        info = tarfile.TarInfo('cifar-10-batches-py/batches.meta')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SystemExit, match='not the CIFAR-10 python archive'):
        cifar10.main(['prep', str(tmp_path / 'evil.tar.gz'), str(tmp_path / 'r2')])


def test_reach_step_interpolates_on_log_fd():
    fd = {'1000': 40.0, '2000': 20.0, '3000': 10.0}
    assert cifar10.reach_step(fd, [1000, 2000, 3000], math.sqrt(200))[0] == pytest.approx(2500)   # geometric middle
    assert cifar10.reach_step(fd, [1000, 2000, 3000], 20.0)[0] == pytest.approx(2000)
    assert cifar10.reach_step(fd, [1000, 2000, 3000], 40.0 * 2 ** -0.25)[0] == pytest.approx(1250)
    assert cifar10.reach_step(fd, [1000, 2000, 3000], 50.0) == (None, 'before')
    assert cifar10.reach_step(fd, [1000, 2000, 3000], 9.0) == (None, 'never')


def test_t_interval_and_paired_differences_by_hand():
    mean, half = cifar10.t_interval([1.0, 2.0, 3.0])                            # sd 1, n 3: t(0.975, 2) = 4.3027
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    results = [dict(arm='a', seed=0, fd={'9': 5.0}), dict(arm='b', seed=0, fd={'9': 7.0}),
               dict(arm='a', seed=1, fd={'9': 4.0}), dict(arm='b', seed=1, fd={'9': 3.5}),
               dict(arm='a', seed=2, fd={})]
    assert cifar10.paired(results, 'a', 'b', '9') == {0: -2.0, 1: 0.5}

# -----------------------------------------------------------------------------
# The title question: the targets of hubconf.py, the probe, the bootstrap, `title --quick`

def test_title_targets_by_hand(monkeypatch):
    monkeypatch.setattr(hubconf, 'load_weights', lambda model, weights, file_name: random_weights(model))
    x = torch.randn(3, 3, 32, 32)
    base = hubconf.resnet20_stage3().forward_features(x)['x_norm_patchtokens']            # (3, 64, 64)
    tokens = lambda entry: getattr(hubconf, entry)().forward_features(x)['x_norm_patchtokens']
    for entry, alpha in (('resnet20_stage3_global025', 0.25), ('resnet20_stage3_global05', 0.5),
                         ('resnet20_stage3_global1', 1.0)):
        assert torch.allclose(tokens(entry), base + alpha * base.mean(1, keepdim=True), atol=1e-6)
    shuf = tokens('resnet20_stage3_shuffled')
    assert torch.equal(shuf, tokens('resnet20_stage3_shuffled'))                  # the same permutation every call
    for b in range(3):                                                          # a permutation of the image's tokens
        assert torch.equal(shuf[b].sort(0).values, base[b].sort(0).values) and not torch.equal(shuf[b], base[b])
    order = [torch.cdist(shuf[b], base[b]).argmin(1) for b in range(3)]
    assert not torch.equal(order[0], order[1])                                  # each image its own permutation
    stage2 = hubconf.resnet20_stage3().stages(x, 2)[-1]                         # (3, 32, 16, 16)
    pooled = tokens('resnet20_stage2_pooled')
    assert pooled.shape == (3, 64, 32) and torch.allclose(pooled[:, 3 * 8 + 5], stage2[:, :, 6:8, 10:12].mean((2, 3)))
    pix = tokens('pixels')
    assert pix.shape == (3, 64, 48) and torch.equal(pix[:, 2 * 8 + 7], x[:, :, 8:12, 28:32].flatten(1))
    state = torch.random.get_rng_state()
    a, b = hubconf.resnet20_random_stage3(), hubconf.resnet20_random_stage3()
    assert torch.equal(torch.random.get_rng_state(), state)                     # the global generator untouched
    assert torch.equal(a.forward_features(x)['x_norm_patchtokens'], b.forward_features(x)['x_norm_patchtokens'])


def test_title_targets_load_as_irepa_encoders(weights_dir):
    """Every title target through irepa.py's own encoder wrapper and torch.hub (a fresh import of hubconf.py, which
    reads the random weights of $CIFAR_RESNET_DIR): 8x8 tokens of its width at 32 px."""
    import irepa
    img = torch.randint(0, 256, (2, 3, 32, 32)).float()
    for entry in cifar10.TITLE_TARGETS:
        if entry == 'hog':
            continue
        enc = irepa.load_encoder(entry, 8, os.path.join(HERE, 'experiments'))
        with torch.no_grad():
            assert enc(img).shape == (2, 64, enc.embed_dim), entry


def test_seed_adjusted_fd_closed_form():
    # the residual sd: a and b rise by 2 and 4 from seed 0 to 1, so b_1 = 3 and every residual is +-0.5;
    # RSS 1 over 4 runs - 3 parameters
    assert cifar10.additive_fit({'a': {0: 10.0, 1: 12.0}, 'b': {0: 7.0, 1: 11.0}})[1:] == (pytest.approx(1.0), 1)
    assert cifar10.additive_fit({}) == ({}, None, 0)
    # no arm links the two seeds: the split is not identified, the plain means come back
    assert cifar10.additive_fit({'a': {0: 10.0}, 'b': {1: 5.0}}) == ({'a': 10.0, 'b': 5.0}, None, 0)
    # every arm has both seeds: the mean over seeds
    fds = {'a': {0: 10.0, 1: 12.0}, 'b': {0: 7.0, 1: 11.0}}
    assert cifar10.seed_adjusted(fds) == pytest.approx({'a': 11.0, 'b': 9.0})
    # c has seed 0 only: seed 1 runs 3 higher on average (2 and 4), so c sits at 5 + 3 / 2 on the average-seed scale
    fds['c'] = {0: 5.0}
    assert cifar10.seed_adjusted(fds) == pytest.approx({'a': 11.0, 'b': 9.0, 'c': 6.5})
    fds['d'] = {1: 6.0}                                                          # and d, seed 1 only: 6 - 3 / 2
    assert cifar10.seed_adjusted(fds)['d'] == pytest.approx(4.5)


def test_linear_probe_and_bootstrap():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    centres = 5 * torch.randn(4, 8, generator=g)
    x = centres[y] + torch.randn(400, 8, generator=g)                           # separable classes
    assert cifar10.linear_probe(x[:200], y[:200], x[200:], y[200:]) > 0.97
    noise = torch.randn(400, 8, generator=g)                                    # no label information: near chance
    assert cifar10.linear_probe(noise[:200], y[:200], noise[200:], y[200:]) < 0.4
    xs = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    c = cifar10.bootstrap(xs, 3 - 2 * xs, n=200)
    assert c['r'] == pytest.approx((-1, -1, -1)) and c['rho'] == pytest.approx((-1, -1, -1))
    ys = np.array([2.0, 1.0, 4.0, 3.0, 6.0, 5.0])
    c = cifar10.bootstrap(xs, ys, n=2000)
    assert c['r'][0] == pytest.approx(np.corrcoef(xs, ys)[0, 1]) and c['r'][1] < c['r'][0] <= c['r'][2] <= 1


def test_linear_probe_reaches_the_optimum():
    """fit_probe ends at the optimum of its convex loss, found here by Newton's method (exact Hessian, float64), on
    a problem as ill-conditioned as raw pixels' (16 features, nearly all one 2-d signal): 200 float32 L-BFGS
    iterations stop 2e-5 above it, and float64 with L-BFGS's default stopping rule (loss change < 1e-9) 5e-8."""
    g = torch.Generator().manual_seed(0)
    n, d, k = 1000, 16, 4
    y = torch.arange(n) % k
    s = torch.randn(n, 2, generator=g, dtype=torch.float64) + torch.randn(k, 2, generator=g, dtype=torch.float64)[y]
    x = s @ torch.randn(2, d, generator=g, dtype=torch.float64) + 0.02 * torch.randn(n, d, generator=g,
                                                                                   dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    loss = lambda theta: (torch.nn.functional.cross_entropy(x @ theta[:-k].view(d, k) + theta[-k:], y) +
                          cifar10.PROBE_WD * theta[:-k].pow(2).sum())                  # theta = (W, b) flattened
    theta = torch.zeros(d * k + k, dtype=torch.float64)
    for _ in range(30):           # Newton; lstsq, as the Hessian is singular along b + c (every logit shifted alike)
        H, grad = torch.autograd.functional.hessian(loss, theta), torch.autograd.functional.jacobian(loss, theta)
        theta = theta - torch.linalg.lstsq(H, grad).solution
    assert torch.autograd.functional.jacobian(loss, theta).abs().max() < 1e-12
    W, b = cifar10.fit_probe(x, y)
    assert loss(torch.cat([W.flatten(), b])).item() == pytest.approx(loss(theta).item(), rel=0, abs=1e-8)
    assert torch.allclose(W, theta[:-k].view(d, k), atol=1e-2)
    with pytest.raises(RuntimeError, match='did not converge'):                # a cap it cannot meet: said loudly
        cifar10.fit_probe(x, y, max_iter=20)


def test_quick_title_writes_every_output(tiny_cifar, weights_dir, monkeypatch, capsys):
    monkeypatch.setattr(cifar10, 'TITLE_ARMS', dict(list(cifar10.TITLE_ARMS.items())[:2]))   # two targets train
    out = tiny_cifar / 'out'
    argv = ['--out-dir', str(out), 'title', '--data-path', str(tiny_cifar / 'data'), '--quick']
    cifar10.main(argv)
    seeds = cifar10.QUICK['seeds']
    for arm in cifar10.TITLE_ARMS:
        for s in seeds:
            assert set(json.load(open(out / 'results' / f'{arm}-s{s}.json'))['fd']) == {'2', '4'}
    targets = json.load(open(out / 'results' / 'title_targets.json'))
    assert set(targets) == set(cifar10.TITLE_TARGETS)
    assert all(0 <= targets[t][k] <= 1 for t in targets for k in ('probe', 'probe_token'))
    report = open(out / 'title.md').read()
    fd = [json.load(open(out / 'results' / f'REPA-ResNet20-global0.25-s{s}.json'))['fd']['4'] for s in seeds]
    assert f"| resnet20_stage3_global025 | 64 | {targets['resnet20_stage3_global025']['probe']:.3f} |" in report
    assert f"| {np.mean(fd):.2f} ± {np.std(fd, ddof=1):.2f} | {np.mean(fd):.2f} | - | 2 |" in report  # no vanilla
    assert os.path.isfile(out / 'title_alpha.png') and not os.path.isfile(out / 'title_fd.png')   # 2 targets: no r
    capsys.readouterr()
    cifar10.main(argv)                                                          # finished pieces are skipped
    assert 'FD' not in capsys.readouterr().out.replace('wrote', '')
    # with the main tables' REPA runs, four targets have an FD: the correlations and Figure 4
    for arm, v in (('REPA-ResNet20', 9.0), ('REPA-HOG', 7.0)):
        json.dump(dict(arm=arm, seed=0, fd={'4': v}, commit='x'), open(out / 'results' / f'{arm}-s0.json', 'w'))
    # vanilla at both seeds, and a seed 2 of REPA-ResNet20 that the title question leaves out (it pairs seeds 0, 1)
    for seed, v in ((0, 10.0), (1, 12.0)):
        json.dump(dict(arm='vanilla', seed=seed, fd={'4': v}, commit='x'),
                  open(out / 'results' / f'vanilla-s{seed}.json', 'w'))
    json.dump(dict(arm='REPA-ResNet20', seed=2, fd={'4': 100.0}, commit='x'),
              open(out / 'results' / 'REPA-ResNet20-s2.json', 'w'))
    cifar10.main(argv + ['--report'])
    report = open(out / 'title.md').read()
    done = ['resnet20_stage3', 'hog'] + [enc for enc, _, _ in cifar10.TITLE_ARMS.values()]
    per_seed = {arm: [json.load(open(out / 'results' / f'{arm}-s{s}.json'))['fd']['4'] for s in seeds]
                for arm in cifar10.TITLE_ARMS}
    # ResNet-20 and HOG finished seed 0 only: the additive fit moves them by half the mean seed-1 - seed-0 gap of
    # the arms that have both seeds (the two title arms; vanilla is not a REPA run and stays out of the fit)
    gap = np.mean([v[1] - v[0] for v in per_seed.values()])
    fds = [9.0 + gap / 2, 7.0 + gap / 2] + [np.mean(v) for v in per_seed.values()]
    r = np.corrcoef([targets[t]['lds'] for t in done], fds)[0, 1]
    r0 = np.corrcoef([targets[t]['lds'] for t in done], [9.0, 7.0] + [v[0] for v in per_seed.values()])[0, 1]
    row = lambda name: next(line for line in report.splitlines() if line.startswith(f'| {name} |'))  # the first
    assert f"| LDS | {r:+.2f} | [" in report and row('LDS').endswith(f"| {r0:+.2f} | - |")   # seed 1: 2 targets
    assert f"| LDS | - | {r:+.2f} |" in report                 # r at each step: at step 2 only 2 targets have an FD
    assert f"| 9.00 | {9 + gap / 2:.2f} | {9 + gap / 2 - 11:+.2f} | 1 | - |" in report  # seed 2 out; no SiT LDS
    lds = [json.load(open(out / 'results' / f'REPA-ResNet20-global0.25-s{s}.json'))['lds'] for s in seeds]
    assert f"| 2 | {np.mean(lds):.3f} |" in row('resnet20_stage3_global025')
    assert f"| {np.mean(fd) - 11.0:+.2f} | 2 |" in row('resnet20_stage3_global025')      # minus vanilla's mean
    assert f"The {2 * len(seeds)} finished runs of new targets took" in report       # the cost of the title arms
    assert row('0.25').endswith(f"| {fd[0] - 9.0:+.2f} |")          # global0.25 vs ResNet-20, paired: seed 0 only
    # seed noise: the additive fit's residual sd over the main tables' REPA / iREPA arms. Here REPA-HOG and
    # iREPA-HOG rise by 2 and 4 from seed 0 to 1: b = 3, residuals +-0.5, RSS 1 over 5 runs - 4 parameters
    assert 'Seed noise' not in report                                                # one seed each: no df
    for arm, fd01 in (('REPA-HOG', (7.0, 9.0)), ('iREPA-HOG', (8.0, 12.0))):
        for seed, v in enumerate(fd01):
            json.dump(dict(arm=arm, seed=seed, fd={'4': v}, commit='x'),
                      open(out / 'results' / f'{arm}-s{seed}.json', 'w'))
    cifar10.main(argv + ['--report'])
    assert "leaves a residual sd of 1.00 (1 degrees of freedom)" in open(out / 'title.md').read()
    assert Image.open(out / 'title_fd.png').size == (960, 480)
