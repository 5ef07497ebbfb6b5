"""Tests for vae.py (the SD-VAE). Small, CPU-only, no network: python -m pytest -q test_vae.py"""
import math
import os
import socket
import urllib.error

import pytest
import torch
import torch.nn.functional as F

import vae as V

def small_vae(seed=0):
    # Same architecture with ch 32 (GroupNorm needs a multiple of 32): fast forward passes on CPU.
    torch.manual_seed(seed)
    return V.AutoencoderKL(ch=32).eval()

# -----------------------------------------------------------------------------
# Architecture: the official parameter names, counts and shapes

def official_keys():
    """The state-dict names of the official VAE_F8D4, written out from the LDM naming scheme."""
    wb = ('weight', 'bias')
    res = lambda p, shortcut: [f'{p}.{m}.{s}' for s in wb
                               for m in ('norm1', 'conv1', 'norm2', 'conv2') + ('nin_shortcut',) * shortcut]
    mid = lambda p: (res(f'{p}.mid.block_1', 0) + res(f'{p}.mid.block_2', 0) +
                     [f'{p}.mid.attn_1.{m}.{s}' for m in ('norm', 'q', 'k', 'v', 'proj_out') for s in wb])
    ends = lambda p: [f'{p}.{m}.{s}' for m in ('conv_in', 'norm_out', 'conv_out') for s in wb]
    keys = ends('encoder') + ends('decoder') + mid('encoder') + mid('decoder')
    for i in range(4):                                  # widths 128, 256, 512, 512: the width changes at i = 1, 2
        keys += [k for j in range(2) for k in res(f'encoder.down.{i}.block.{j}', j == 0 and i in (1, 2))]
        keys += [f'encoder.down.{i}.downsample.conv.{s}' for s in wb] * (i < 3)
        # decoder up[i] at the width of encoder level i; its first block comes from up[i+1] (or mid: 512)
        keys += [k for j in range(3) for k in res(f'decoder.up.{i}.block.{j}', j == 0 and i in (0, 1))]
        keys += [f'decoder.up.{i}.upsample.conv.{s}' for s in wb] * (i > 0)
    return keys + [f'{m}.{s}' for m in ('quant_conv', 'post_quant_conv') for s in wb]

def test_state_dict_names_and_parameter_count():
    with torch.device('meta'):
        model = V.AutoencoderKL()
    sd = model.state_dict()
    assert len(sd) == 248
    assert set(sd) == set(official_keys()) and len(official_keys()) == 248
    assert sum(p.numel() for p in model.parameters()) == 83_653_863             # 83.65M
    assert sd['encoder.conv_out.weight'].shape == (8, 512, 3, 3)                # double_z: mean and logvar
    assert sd['quant_conv.weight'].shape == (8, 8, 1, 1) and sd['post_quant_conv.weight'].shape == (4, 4, 1, 1)
    assert sd['decoder.conv_in.weight'].shape == (512, 4, 3, 3)
    assert sd['decoder.up.0.block.0.nin_shortcut.weight'].shape == (128, 256, 1, 1)   # up[0]: full resolution
    assert sd['decoder.up.3.upsample.conv.weight'].shape == (512, 512, 3, 3)
    assert sd['encoder.down.0.downsample.conv.weight'].shape == (128, 128, 3, 3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)

def test_encode_decode_shapes():
    model = small_vae()
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    with torch.no_grad():
        mean, logvar = model.encode(x)
        assert mean.shape == logvar.shape == (2, 4, 4, 3)                      # f8, 4 channels
        assert model.decode(mean).shape == (2, 3, 32, 24)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert model.decode(mean).shape == (2, 3, 32, 24)

def test_logvar_clamp():
    model = small_vae()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        for b, expect in ((1e4, 20.0), (-1e4, -30.0)):
            model.quant_conv.bias[4:] = b                                       # channels 4..7 are logvar
            mean, logvar = model.encode(x)
            assert torch.all(logvar == expect) and mean.abs().max() < 1e3

# -----------------------------------------------------------------------------
# Closed-form references for the blocks, in plain torch ops

def test_resnet_block_matches_closed_form():
    torch.manual_seed(0)
    block = V.ResnetBlock(32, 64)
    for p in block.parameters():                                                # non-trivial GroupNorm affine too
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 32, 5, 7)
    swish = lambda t: t * torch.sigmoid(t)
    def gn(t, m):
        g = t.view(t.shape[0], 32, -1)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)
        return g.view_as(t) * m.weight[:, None, None] + m.bias[:, None, None]
    h = F.conv2d(swish(gn(x, block.norm1)), block.conv1.weight, block.conv1.bias, padding=1)
    h = F.conv2d(swish(gn(h, block.norm2)), block.conv2.weight, block.conv2.bias, padding=1)
    ref = F.conv2d(x, block.nin_shortcut.weight, block.nin_shortcut.bias) + h
    torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)

def test_attention_block_matches_closed_form():
    torch.manual_seed(0)
    attn = V.AttnBlock(64)
    x = torch.randn(2, 64, 3, 5)
    h = F.group_norm(x, 32, attn.norm.weight, attn.norm.bias, eps=1e-6).flatten(2)        # (B, C, N)
    q, k, v = (m.weight[:, :, 0, 0] @ h + m.bias[:, None] for m in (attn.q, attn.k, attn.v))
    w = torch.softmax(torch.einsum('bci,bcj->bij', q, k) / math.sqrt(64), dim=-1)          # (B, N query, N key)
    out = torch.einsum('bij,bcj->bci', w, v)                                                # (B, C, N)
    ref = x + (attn.proj_out.weight[:, :, 0, 0] @ out + attn.proj_out.bias[:, None]).view_as(x)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)

def test_resampling_matches_closed_form():
    torch.manual_seed(0)
    x = torch.randn(1, 32, 6, 6)
    down, up = V.Resample(32, down=True), V.Resample(32, down=False)
    # down: a zero row/column only at the bottom/right, so output (i, j) sees input rows/cols 2i..2i+2
    padded = torch.zeros(1, 32, 7, 7)
    padded[:, :, :6, :6] = x
    ref = F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), ref)
    assert down(x).shape == (1, 32, 3, 3)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1))

# -----------------------------------------------------------------------------
# The training convention: posterior sample, latent normalisation

def test_posterior_sample_statistics():
    mean = torch.full((4, 4, 32, 32), 0.7)
    logvar = torch.full_like(mean, math.log(0.25))                              # std 0.5
    z = V.sample_posterior(mean, logvar, generator=torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 0.7) < 0.01 and abs(z.std().item() - 0.5) < 0.01
    z2 = V.sample_posterior(mean, logvar, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, z2)                                                   # reproducible from the generator
    eps = torch.randn_like(mean)
    torch.testing.assert_close(V.sample_posterior(mean, logvar, noise=eps), 0.7 + 0.5 * eps)

def test_latent_normalisation_round_trip():
    z = torch.randn(2, 4, 8, 8)
    scale = torch.tensor([0.2, 0.3, 0.25, 0.4]).view(1, 4, 1, 1)
    bias = torch.tensor([0.1, -0.2, 0.0, 0.5]).view(1, 4, 1, 1)
    zn = V.normalize_latents(z, scale, bias)
    torch.testing.assert_close(zn[:, 1], (z[:, 1] + 0.2) * 0.3)
    torch.testing.assert_close(V.denormalize_latents(zn, scale, bias), z)

# -----------------------------------------------------------------------------
# Loading: local files, the torch.hub cache, and the offline error

@pytest.fixture(scope='module')
def saved_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('vae')
    torch.manual_seed(1)
    sd = V.AutoencoderKL().state_dict()
    stats = {'latents_scale': torch.tensor([0.2, 0.3, 0.25, 0.4]), 'latents_bias': torch.tensor([0.1, -0.2, 0.0, 0.5])}
    torch.save(sd, d / V.VAE_FILE)
    torch.save(stats, d / V.STATS_FILE)
    return d, sd, stats

def no_network(url, dst, **kw):
    raise urllib.error.URLError('no network in tests')

def test_load_vae_from_local_path(saved_files):
    d, sd, stats = saved_files
    vae, scale, bias = V.load_vae(path=str(d / V.VAE_FILE))
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in sd.items())
    assert scale.shape == bias.shape == (1, 4, 1, 1)
    assert torch.all(scale == V.SD_SCALE) and torch.all(bias == 0)             # no stats file: the SD convention
    _, scale, bias = V.load_vae(path=str(d / V.VAE_FILE), stats_path=str(d / V.STATS_FILE))
    assert torch.equal(scale.flatten(), stats['latents_scale']) and torch.equal(bias.flatten(), stats['latents_bias'])
    broken = dict(sd)
    del broken['decoder.up.1.upsample.conv.weight']
    torch.save(broken, d / 'broken.pt')
    with pytest.raises(RuntimeError, match='Missing key'):                      # strict load
        V.load_vae(path=str(d / 'broken.pt'))

@pytest.mark.parametrize('bad', ['junk vae', 'truncated vae', 'stats without keys'])
def test_damaged_files_give_one_clear_error(saved_files, tmp_path, bad):
    d, sd, stats = saved_files
    vae_path, stats_path = str(d / V.VAE_FILE), str(tmp_path / 'stats.pt')
    torch.save(stats, stats_path)
    if bad == 'junk vae':
        (tmp_path / 'vae.pt').write_text('<html>not found</html>')          # e.g. an error page saved as the file
        vae_path = str(tmp_path / 'vae.pt')
    elif bad == 'truncated vae':
        (tmp_path / 'vae.pt').write_bytes(open(d / V.VAE_FILE, 'rb').read()[:100_000])
        vae_path = str(tmp_path / 'vae.pt')
    else:
        torch.save({'scale': torch.ones(4)}, stats_path)
    with pytest.raises(RuntimeError) as e:
        V.load_vae(path=vae_path, stats_path=stats_path)
    assert '\n' not in str(e.value) and (vae_path if 'vae' in bad else stats_path) in str(e.value)

def test_load_vae_from_hub_cache_offline(saved_files, tmp_path, monkeypatch):
    d, sd, stats = saved_files
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    assert torch.hub.get_dir() == str(tmp_path / 'hub')
    os.makedirs(tmp_path / 'hub' / 'checkpoints')
    for name in (V.VAE_FILE, V.STATS_FILE):
        os.symlink(d / name, tmp_path / 'hub' / 'checkpoints' / name)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    vae, scale, bias = V.load_vae()
    assert torch.equal(vae.state_dict()['encoder.conv_in.weight'], sd['encoder.conv_in.weight'])
    assert torch.equal(bias.flatten(), stats['latents_bias'])

def test_download_url_and_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    calls = []
    def fake_download(url, dst, **kw):
        calls.append((url, socket.getdefaulttimeout()))
        torch.save({'latents_scale': torch.ones(4), 'latents_bias': torch.zeros(4)}, dst)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake_download)
    before = socket.getdefaulttimeout()
    path = V.cached_file(V.STATS_FILE)
    assert path == str(tmp_path / 'hub' / 'checkpoints' / V.STATS_FILE) and os.path.isfile(path)
    assert calls == [('https://huggingface.co/REPA-E/iREPA-collections/resolve/main/pretrained_models/'
                      'sdvae-ft-mse-f8d4-latents-stats.pt', 60)]
    assert socket.getdefaulttimeout() == before                                 # restored
    V.cached_file(V.STATS_FILE)
    assert len(calls) == 1                                                      # downloaded once, then cached

def test_missing_files_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    with pytest.raises(RuntimeError) as e:
        V.load_vae()
    msg = str(e.value)
    assert '\n' not in msg and V.VAE_FILE in msg and V.STATS_FILE in msg
    assert str(tmp_path / 'hub' / 'checkpoints') in msg and 'REPA-E/iREPA-collections' in msg

def test_read_stats_takes_the_official_shape(tmp_path):
    """The official stats file stores latents_scale and latents_bias as (1, 4, 1, 1): read back as (4,) each, so a
    prepared folder's manifest holds 4 numbers whichever way it was made; anything but 4 values is refused."""
    path = str(tmp_path / 'stats.pt')
    torch.save({'latents_scale': torch.arange(1., 5.).view(1, 4, 1, 1), 'latents_bias': torch.zeros(1, 4, 1, 1)}, path)
    scale, bias = V.read_stats(path)
    assert scale.tolist() == [1., 2., 3., 4.] and bias.shape == (4,)
    torch.save({'latents_scale': torch.ones(3), 'latents_bias': torch.zeros(3)}, path)
    with pytest.raises(RuntimeError, match='must hold 4 values each'):
        V.read_stats(path)
