"""Tests for irepa.py: SiT, the projectors, the encoders, the losses, the settings and the loop. Small, CPU-only, no
network: python -m pytest -q"""
import argparse
import glob
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import irepa
import meanflow
import runs
import trained
import vae
from conftest import HUBCONF

HERE = os.path.dirname(os.path.abspath(__file__))

def tiny(sit=irepa.SiT, **kw):
    cfg = dict(input_size=16, patch_size=4, hidden_size=32, depth=3, num_heads=2, num_classes=5, encoder_depth=2)
    cfg.update(kw)
    return sit(**cfg)

# -----------------------------------------------------------------------------
# SiT

@pytest.mark.parametrize('name', list(irepa.SiT_models))
def test_every_model_size_shapes(name):
    # Built on the meta device: real shapes and parameter counts, no memory or compute.
    with torch.device('meta'):
        model = irepa.SiT_models[name](input_size=32, num_classes=10, target_dim=24, projector='conv')
        x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 10])
        out, h_proj = model(x, t, y)
    assert out.shape == x.shape
    assert h_proj.shape == (2, (32 // model.patch_size) ** 2, 24)

def test_sit_xl2_parameter_count_matches_dit():
    # DiT-XL/2 on 32x32x4 latents with 1000 classes has 675,129,632 parameters (pos_embed included); it also
    # learns sigma (final linear to 2C channels: 1152 * 16 + 16 = 18,448 more). SiT predicts C channels.
    with torch.device('meta'):
        model = irepa.SiT_models['SiT-XL/2'](input_size=32, in_channels=4, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632 - 18_448

def test_sit_forward_real_small_and_zero_init_output():
    model = tiny(target_dim=8)
    x = torch.randn(3, 3, 16, 16)
    out, h_proj = model(x, torch.rand(3), torch.tensor([0, 4, 5]))    # 5 = the null class
    assert out.shape == x.shape and h_proj.shape == (3, 16, 8)
    assert torch.all(out == 0)                                     # adaLN-Zero: final linear starts at zero
    model = tiny(target_dim=None)
    assert model(x, torch.rand(3), torch.tensor([0, 1, 2]))[1] is None
    assert model.projectors is None

def test_sit_s_final_layer_has_its_own_width():
    # The official REPA/iREPA code builds SiT-S with a 768-wide final layer and crashes.
    model = irepa.SiT_models['SiT-S/4'](input_size=16, num_classes=3, target_dim=8)
    assert model.final_layer.linear.in_features == 384
    assert model.final_layer.adaLN_modulation[1].weight.shape == (2 * 384, 384)
    out, _ = model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    assert out.shape == (2, 3, 16, 16)

def official_keys(depth, projector):
    keys = {'pos_embed', 'x_embedder.proj.weight', 'x_embedder.proj.bias', 'y_embedder.embedding_table.weight',
            'final_layer.adaLN_modulation.1.weight', 'final_layer.adaLN_modulation.1.bias',
            'final_layer.linear.weight', 'final_layer.linear.bias'}
    keys |= {f't_embedder.mlp.{i}.{w}' for i in (0, 2) for w in ('weight', 'bias')}
    for n in range(depth):
        keys |= {f'blocks.{n}.{m}.{w}' for m in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2', 'adaLN_modulation.1')
                 for w in ('weight', 'bias')}
    if projector == 'mlp':
        keys |= {f'projectors.0.{i}.{w}' for i in (0, 2, 4) for w in ('weight', 'bias')}
    else:
        keys |= {'projectors.0.weight', 'projectors.0.bias'}
    return keys

@pytest.mark.parametrize('projector', ['mlp', 'conv'])
def test_official_state_dict_round_trip_by_name(projector):
    model = tiny(target_dim=8, projector=projector)
    sd = model.state_dict()
    assert set(sd) == official_keys(3, projector)
    assert sd['y_embedder.embedding_table.weight'].shape == (6, 32)   # num_classes + 1 null row
    if projector == 'mlp':
        assert sd['projectors.0.0.weight'].shape == (2048, 32) and sd['projectors.0.4.weight'].shape == (8, 2048)
    # an "official" dict with random values, as a plain name -> tensor mapping, loads strictly by name
    official = {k: torch.randn_like(v) for k, v in sd.items()}
    fresh = tiny(target_dim=8, projector=projector)
    fresh.load_state_dict(official, strict=True)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])
    model.load_state_dict(official)
    for a, b in zip(model(x, t, y), fresh(x, t, y)):
        torch.testing.assert_close(a, b)

def test_a_seed_gives_the_same_sit_weights_with_any_projector():
    nets = {}
    for target_dim, projector in ((None, 'mlp'), (24, 'mlp'), (24, 'conv')):
        torch.manual_seed(0)
        nets[target_dim, projector] = irepa.SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2,
                                           num_heads=2, num_classes=3, encoder_depth=1, target_dim=target_dim,
                                           projector=projector).state_dict()
    vanilla = nets.pop((None, 'mlp'))
    for sd in nets.values():
        assert {k for k in sd if not k.startswith('projectors.')} == set(vanilla)
        assert all(torch.equal(sd[k], v) for k, v in vanilla.items())      # the same SiT: arms paired on weights too

def test_official_initialisation():
    model = tiny(target_dim=8)
    for blk in model.blocks:
        assert torch.all(blk.adaLN_modulation[1].weight == 0) and torch.all(blk.adaLN_modulation[1].bias == 0)
        assert blk.attn.qkv.bias is not None and torch.all(blk.attn.qkv.bias == 0)
    assert torch.all(model.final_layer.linear.weight == 0)
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.01
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.005
    w = model.blocks[0].mlp.fc1.weight                                 # xavier uniform bound sqrt(6 / (in + out))
    assert w.abs().max() <= (6 / sum(w.shape)) ** 0.5 and w.abs().max() > 0.9 * (6 / sum(w.shape)) ** 0.5
    assert not model.pos_embed.requires_grad

def test_sincos_position_embedding_layout():
    D, G = 16, 4
    pe = irepa.sincos_2d(D, G)                                         # (G*G, D), raster order
    assert pe.shape == (G * G, D)
    r, c = 2, 3
    tok = pe[r * G + c]
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    np.testing.assert_allclose(tok[:D // 4], np.sin(c * omega))         # first half: column index
    np.testing.assert_allclose(tok[D // 4:D // 2], np.cos(c * omega))
    np.testing.assert_allclose(tok[D // 2:3 * D // 4], np.sin(r * omega))  # second half: row index
    np.testing.assert_allclose(tok[3 * D // 4:], np.cos(r * omega))

def test_timestep_embedding_frequencies():
    emb = irepa.TimestepEmbedder(8)
    t = torch.tensor([0.3])
    f = torch.exp(-np.log(10000) * torch.arange(128) / 128)
    expected = torch.cat([torch.cos(0.3 * f), torch.sin(0.3 * f)])
    captured = {}
    emb.mlp[0].register_forward_hook(lambda m, inp, out: captured.update(x=inp[0]))
    emb(t)
    torch.testing.assert_close(captured['x'][0], expected)

def test_attention_matches_explicit_softmax():
    attn = irepa.Attention(16, 2)
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    torch.testing.assert_close(attn(x), attn.proj(a.transpose(1, 2).reshape(2, 5, 16)))
    with torch.autocast('cpu', dtype=torch.bfloat16):                      # the explicit CPU bf16 path
        low = attn(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), attn(x), atol=0.03, rtol=0.03)

# -----------------------------------------------------------------------------
# Projectors and spatial normalisation

def test_conv_projector_equals_manual_unfold_and_raster_order():
    torch.manual_seed(0)
    B, H, D, Z = 2, 4, 6, 5
    proj = irepa.ConvProjector(D, Z)
    x = torch.randn(B, H * H, D)
    out = proj(x)
    assert out.shape == (B, H * H, Z)
    # manual: token (r, c) = raster index r * H + c; zero padding; sum over the 3x3 neighbourhood
    grid = torch.zeros(B, H + 2, H + 2, D)
    for r in range(H):
        for c in range(H):
            grid[:, r + 1, c + 1] = x[:, r * H + c]
    for r in range(H):
        for c in range(H):
            patch = grid[:, r:r + 3, c:c + 3]                         # (B, 3, 3, D)
            ref = torch.einsum('bijd,zdij->bz', patch, proj.weight) + proj.bias
            torch.testing.assert_close(out[:, r * H + c], ref, atol=1e-5, rtol=1e-5)
    # a single token at (1, 2) only reaches its 3x3 neighbourhood, in raster order
    proj.bias.data.zero_()
    x = torch.zeros(1, H * H, D)
    x[0, 1 * H + 2] = 1
    touched = {i for i in range(H * H) if proj(x)[0, i].abs().sum() > 0}
    assert touched == {r * H + c for r in (0, 1, 2) for c in (1, 2, 3)}

def test_1x1_conv_is_the_per_token_linear_map():
    proj = irepa.ConvProjector(6, 4, kernel_size=1)
    x = torch.randn(2, 9, 6)
    torch.testing.assert_close(proj(x), F.linear(x, proj.weight[:, :, 0, 0], proj.bias))

def test_mlp_projector_is_per_token():
    proj = irepa.mlp_projector(8, 3)
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(proj(x)[:, 2], proj(x[:, 2:3])[:, 0])

@pytest.mark.parametrize('gamma', [0.0, 0.6, 0.8, 1.0])
def test_spatial_norm_statistics(gamma):
    torch.manual_seed(0)
    x = torch.randn(3, 16, 7) * 2 + torch.randn(1, 1, 7) * 5           # strong shared (global) component
    eps = 1e-6
    y = irepa.spatial_norm(x, gamma=gamma, eps=eps)
    mu, sd = x.mean(1), x.std(1)
    torch.testing.assert_close(y.mean(1), (1 - gamma) * mu / (sd + eps), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.std(1), sd / (sd + eps), atol=1e-5, rtol=1e-5)
    assert irepa.spatial_norm.__defaults__ == (0.6, 1e-6)

def test_alignment_loss():
    z = torch.randn(2, 9, 7)
    torch.testing.assert_close(irepa.alignment_loss(z, 3 * z), torch.tensor(-1.0))     # scale invariant
    torch.testing.assert_close(irepa.alignment_loss(z, -z), torch.tensor(1.0))
    h_proj = z.to(torch.bfloat16)
    assert irepa.alignment_loss(h_proj, z).dtype == torch.float32
    a, b = torch.randn(2, 9, 7), torch.randn(2, 9, 7)
    torch.testing.assert_close(irepa.alignment_loss(a, b), -F.cosine_similarity(a, b, dim=-1).mean())

# -----------------------------------------------------------------------------
# Flow matching

def test_interpolant_endpoints_and_velocity():
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    xt, v = irepa.interpolant(x, eps, torch.zeros(2))
    torch.testing.assert_close(xt, x)                                  # t = 0: data
    xt, v = irepa.interpolant(x, eps, torch.ones(2))
    torch.testing.assert_close(xt, eps)                                # t = 1: noise
    torch.testing.assert_close(v, eps - x)
    t = torch.tensor([0.3, 0.7])                                       # d x_t / dt by finite differences
    h = 1e-3
    fd = (irepa.interpolant(x, eps, t + h)[0] - irepa.interpolant(x, eps, t - h)[0]) / (2 * h)
    torch.testing.assert_close(fd, v, atol=1e-3, rtol=1e-3)

def test_x_prediction_velocity():
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([0.5, 0.01])
    xt, v = irepa.interpolant(x, eps, t)
    v_hat = irepa.to_velocity(x, xt, t, 'x')                           # a perfect x-prediction
    torch.testing.assert_close(v_hat[0], v[0])                         # exact where t >= 0.05
    torch.testing.assert_close(v_hat[1], v[1] * 0.01 / 0.05)           # clamped near the data
    assert irepa.to_velocity(xt, xt, t, 'v') is xt

class Oracle(torch.nn.Module):
    """A perfect x-predictor for one known batch: returns the clean images whatever x_t is."""
    pred, num_classes = "x", 5
    def __init__(self, x):
        super().__init__()
        self.x = x
    def forward(self, x_t, t, y):
        return self.x.clone(), None

@pytest.mark.parametrize('t', [0.01, 0.03, 0.5])
def test_perfect_x_prediction_has_zero_loss_at_every_t(t):
    # Both velocities use the same clamped t (JiT's denoiser.py); clamping only the prediction would leave
    # a loss of ~1.28 at t = 0.01 for the perfect predictor, so its optimum would not be x.
    x, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    denoise, _ = irepa.flow_matching_loss(Oracle(x), x, torch.zeros(4, dtype=torch.long), eps,
                                          torch.full((4,), t), pred='x')
    assert denoise.item() < 1e-10
    off = Oracle(x + 0.1)                                                  # x-error 0.1 -> loss 0.01 / max(t, 0.05)^2
    denoise, _ = irepa.flow_matching_loss(off, x, torch.zeros(4, dtype=torch.long), eps, torch.full((4,), t), pred='x')
    assert denoise.item() == pytest.approx(0.01 / max(t, 0.05) ** 2, rel=1e-4)

def test_denoising_loss_definition():
    model = tiny()
    x, eps, t, y = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.rand(4), torch.arange(4)
    d, a = irepa.flow_matching_loss(model, x, y, eps, t)
    assert a == 0 and a.dtype == d.dtype                                   # no target: nothing to align
    torch.testing.assert_close(d, ((eps - x) ** 2).mean())             # zero-init net predicts v = 0

def test_overfit_one_batch():
    torch.manual_seed(0)
    model = tiny(target_dim=36, projector='conv', depth=2, encoder_depth=1)
    enc = irepa.load_encoder('hog', 4)
    img = torch.stack([data.Shapes(8, 16)[i][0] for i in range(8)]).float()
    x, y = img / 127.5 - 1, torch.arange(8) % 4
    z = irepa.spatial_norm(enc(img))
    eps, t = torch.randn_like(x), torch.rand(8)                        # one fixed batch
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        d, a = irepa.flow_matching_loss(model, x, y, eps, t, z)
        loss = d + 0.5 * a
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((loss.item(), d.item(), a.item()))
    assert losses[-1][1] < 0.5 * losses[0][1], losses[::10]            # denoising loss halves
    assert losses[-1][2] < losses[0][2] - 0.3, losses[::10]            # alignment improves

# -----------------------------------------------------------------------------
# Encoders


def test_dinov2_loads_from_local_hub_dir(hub_dir):
    enc = irepa.load_encoder('dinov2_vits14', grid_size=3, hub_repo=hub_dir)
    assert enc.embed_dim == 24 and enc.resolution == 42
    assert enc.model.pos_embed.shape == (1, 1 + 9, 24)                     # resampled once, to the 3x3 grid
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    z = enc(torch.rand(2, 3, 32, 32) * 255)
    assert z.shape == (2, 9, 24)

def test_dinov2_preprocessing(hub_dir):
    enc = irepa.load_encoder('dinov2_vits14', grid_size=2, hub_repo=hub_dir)
    seen = {}
    enc.model.patch_embed.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    img = torch.rand(1, 3, 28, 28) * 255                                   # already 14 * grid: no resize
    enc(img)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen['x'], (img / 255 - mean) / std)

def test_dinov2_loads_offline_from_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / 'torchhome' / 'hub'
    repo = cache / 'facebookresearch_dinov2_main'
    repo.mkdir(parents=True)
    (repo / 'hubconf.py').write_text(HUBCONF)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(cache))
    assert irepa.load_encoder('dinov2_vits14', grid_size=2).embed_dim == 24

def test_dinov3_gated_weights_and_preprocessing(hub_dir, tmp_path, monkeypatch):
    """DINOv3 (official ldm/models/dinov3_loader.py): /255, bilinear antialiased resize to 16 * grid (torchvision's
    Resize, as PIL's bilinear), ImageNet mean/std; the weights file is given by path and a missing one is named."""
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hubhome'))
    with pytest.raises(RuntimeError, match=r"gated.*dinov3_vits16_pretrain_lvd1689m-08c60483\.pth.*hubhome") as e:
        irepa.load_encoder('dinov3_vits16', grid_size=2, hub_repo=hub_dir)
    assert '\n' not in str(e.value)
    os.makedirs(tmp_path / 'hubhome' / 'checkpoints')
    torch.manual_seed(0)
    weights = {k: torch.randn_like(v) for k, v in
               torch.nn.Conv2d(3, 20, 16, 16).state_dict().items()}
    torch.save({f'patch_embed.{k}': v for k, v in weights.items()},
               tmp_path / 'hubhome' / 'checkpoints' / 'dinov3_vits16_pretrain_lvd1689m-08c60483.pth')
    enc = irepa.load_encoder('dinov3_vits16', grid_size=2, hub_repo=hub_dir)
    torch.testing.assert_close(enc.model.patch_embed.weight, weights['weight'])   # the file's weights
    seen = {}
    enc.model.patch_embed.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    tokens = enc(img)
    assert tokens.shape == (1, 4, 20) and tokens.abs().sum(-1).min() > 0    # CLS / storage (normed to 0) left out
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    want = np.stack([np.asarray(Image.fromarray(c.numpy() / 255, mode='F').resize((32, 32), Image.BILINEAR))
                     for c in img[0]])
    want = (want - mean.reshape(3, 1, 1)) / std.reshape(3, 1, 1)
    torch.testing.assert_close(seen['x'][0], torch.tensor(want, dtype=torch.float32), atol=2e-4, rtol=1e-4)

def test_dinov1_tokens_and_preprocessing(hub_dir):
    """DINOv1 (official DINOEncoder): bicubic resize to 16 * grid after the ImageNet norm, pos_embed resampled once,
    the patch tokens of get_intermediate_layers without the CLS token."""
    enc = irepa.load_encoder('dino_vits16', grid_size=3, hub_repo=hub_dir)
    assert enc.embed_dim == 12 and enc.resolution == 48 and enc.model.pos_embed.shape == (1, 1 + 9, 12)
    seen = {}
    enc.model.patch_embed.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    img = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float() * 255
    tokens = enc(img)
    assert tokens.shape == (2, 9, 12)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen['x'], keys_cubic_resize(((img / 255 - mean) / std).double(), 48).float(),
                               atol=1e-4, rtol=1e-4)
    full = enc.model.get_intermediate_layers(seen['x'])[0]                      # (B, 1 + 9, D): CLS first
    torch.testing.assert_close(tokens, full[:, 1:])

def test_paper_encoders_are_known_to_every_script():
    import metrics
    for name in ('dinov2_vitb14', 'dinov3_vits16', 'dinov3_vitb16', 'dinov3_vitl16', 'dino_vits16', 'dino_vitb16'):
        assert name in irepa.ENCODERS
        assert irepa.get_args(['--encoder', name]).encoder == name
        assert metrics.get_args(['--encoder', name, '--data-path', 'x']).encoder == name

def test_encoder_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder 'clip'.*hog.*dinov2_vitb14_reg"):
        irepa.load_encoder('clip', 4)
    with pytest.raises(RuntimeError, match="could not load encoder 'dinov2_vits14'.*"
                                           "--hub-dir must be a folder with hubconf.py"):
        irepa.load_encoder('dinov2_vits14', 4, hub_repo=str(tmp_path))     # no hubconf.py there

# -----------------------------------------------------------------------------
# Data


def make_folder(root, classes=('b_dog', 'a_cat'), n=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(os.path.join(root, c, f'{i}.png'))
    return str(root)


def test_every_seed_and_epoch_has_its_own_data_order():
    orders = {(s, e): irepa.global_batches(64, 64, seed=s, epoch=e)[0] for s in (0, 1) for e in (0, 1, 1000)}
    assert len({tuple(o) for o in orders.values()}) == len(orders)          # e.g. seed 0 epoch 1000 != seed 1 epoch 0


def test_global_batches_shard_the_same_data_for_any_world_size():
    b = irepa.global_batches(100, 32, seed=0, epoch=3)
    assert len(b) == 3 and all(len(x) == 32 for x in b)
    assert len(set(sum(b, []))) == 96
    assert b == irepa.global_batches(100, 32, seed=0, epoch=3) != irepa.global_batches(100, 32, seed=0, epoch=4)

# -----------------------------------------------------------------------------
# Training: the CLI, DDP equivalence, exact resume, bad input

TRAIN = ['--setting', 'demo', '--no-irepa', '--model', 'SiT-T/4', '--image-size', '16', '--global-batch-size', '8', '--num-workers', '0',
         '--log_every=1', '--lr', '1e-3']

def run_train(tmp, *extra):
    return irepa.main(TRAIN + ['--results-dir', str(tmp)] + list(extra))

def load_last(run_dir):
    return torch.load(runs.latest_checkpoint(run_dir), map_location='cpu', weights_only=False)

@pytest.mark.parametrize('mode', ['none', 'repa', 'irepa'])
def test_train_none_repa_irepa(tmp_path, mode):
    extra = {'none': ['--encoder', 'none'], 'repa': ['--encoder', 'hog'], 'irepa': ['--encoder', 'hog', '--irepa']}
    run_dir = run_train(tmp_path, '--max-steps', '3', *extra[mode])
    ck = load_last(run_dir)
    assert ck['step'] == 3 and ck['args']['class_names'] == data.Shapes.classes
    name = {'none': 'vanilla', 'repa': 'hog-repa', 'irepa': 'hog-irepa'}[mode]
    assert os.path.basename(run_dir) == f'demo-SiT-T-4-{name}'                # run folders say what was trained
    assert ck['args']['method'] == {'none': 'vanilla'}.get(mode, mode)
    assert f"run: demo setting, SiT-T/4, {ck['args']['method']}" in open(os.path.join(run_dir, 'log.txt')).read()
    keys = set(ck['model'])
    assert ('projectors.0.0.weight' in keys) == (mode == 'repa')           # REPA: MLP projector
    assert ('projectors.0.weight' in keys) == (mode == 'irepa')            # iREPA: conv projector
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in keys)
    lines = [l for l in open(os.path.join(run_dir, 'log.txt')) if l.startswith('step ')]
    assert len(lines) == 3 and lines[-1].startswith('step 3/3 | loss ')
    align = float(lines[-1].split('align ')[1].split(')')[0])
    assert (align == 0) == (mode == 'none') and align > -1.0               # -cos in [-1, 0) when aligned
    assert 'provenance: torch' in open(os.path.join(run_dir, 'log.txt')).read()


def test_grad_accum_matches_one_big_batch(tmp_path, fp32):
    a = load_last(run_train(tmp_path / 'a', '--encoder', 'hog', '--irepa', '--max-steps', '2'))
    b = load_last(run_train(tmp_path / 'b', '--encoder', 'hog', '--irepa', '--max-steps', '2', '--grad-accum', '2'))
    for k in a['model']:
        torch.testing.assert_close(a['model'][k], b['model'][k], atol=1e-5, rtol=1e-4)

def torchrun_command(nproc=2):
    """torchrun with nproc CPU ranks on this machine, its rendezvous on a free port."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', str(port)]

def torchrun(*args, nproc=2, script='irepa.py'):
    cmd = [*torchrun_command(nproc), os.path.join(HERE, script), *args]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=HERE)

def test_torchrun_two_cpu_ranks_equals_one_process(tmp_path, fp32):
    args = TRAIN + ['--encoder', 'hog', '--irepa', '--max-steps', '3']
    r = torchrun(*args, '--results-dir', str(tmp_path / 'ddp'))
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = load_last(os.path.join(tmp_path, 'ddp', 'demo-SiT-T-4-hog-irepa'))
    assert ddp['args']['world_size'] == 2
    one = load_last(run_train(tmp_path / 'one', '--encoder', 'hog', '--irepa', '--max-steps', '3'))
    for k in one['model']:
        torch.testing.assert_close(ddp['model'][k], one['model'][k], atol=1e-5, rtol=1e-4)
    r = torchrun(*TRAIN, '--encoder', 'none', '--global-batch-size', '5', '--results-dir', str(tmp_path / 'x'))
    assert r.returncode != 0 and 'not divisible by world size 2' in r.stderr


RECIPE_DEMO_SAMPLER = dict(mode='ode', heun=True, num_steps=25, cfg_scale=4.0)


def test_nan_loss_stops_with_a_message(tmp_path, monkeypatch):
    run_dir = run_train(tmp_path / 'ok', '--encoder', 'none', '--max-steps', '1')
    nan = lambda *a, **k: (torch.tensor(float('nan'), requires_grad=True), torch.tensor(0.0))
    monkeypatch.setattr(irepa, 'flow_matching_loss', nan)
    with pytest.raises(SystemExit, match='loss nan, gradient norm 0 at step 2: stopping. Any checkpoint in'):
        run_train(tmp_path / 'ok', '--encoder', 'none', '--max-steps', '3', '--resume', run_dir)
    assert runs.latest_checkpoint(run_dir).endswith('0000001.pt')

def test_weights_gone_bad_are_never_saved(tmp_path, monkeypatch):
    """A checkpoint step (4) that is not a log step, whose loss is finite but whose gradient is not (NaN weights
    after it): a save step is also a log step, so the run stops there naming the loss and the gradient norm, with
    step 2 its last checkpoint."""
    calls, real = [], irepa.flow_matching_loss
    def bad_gradient_at_step_4(*a, **k):
        denoise, align = real(*a, **k)
        calls.append(1)
        if len(calls) == 4:
            denoise.register_hook(lambda g: g * float('inf'))
        return denoise, align
    monkeypatch.setattr(irepa, 'flow_matching_loss', bad_gradient_at_step_4)
    with pytest.raises(SystemExit, match=r'loss \S+, gradient norm (nan|inf) at step 4: stopping'):
        run_train(tmp_path, '--encoder', 'none', '--max-steps', '6', '--ckpt_every=2', '--log_every=5')
    (run_dir,) = glob.glob(str(tmp_path / '*'))
    ckpt = runs.latest_checkpoint(run_dir)
    assert ckpt.endswith('0000002.pt'), ckpt
    state = torch.load(ckpt, weights_only=False)
    assert all(v.isfinite().all() for part in ('model', 'ema') for v in state[part].values())

def test_a_run_gone_bad_ends_every_rank_alike(tmp_path):
    """--lr 1e30 overflows at step 2 on both ranks: each says the same one line (one write each, none cut short by
    torchrun ending the other) and none aborts holding the process group."""
    r = torchrun(*TRAIN, '--encoder', 'none', '--max-steps', '20', '--lr', '1e30', '--log_every=1',
                 '--results-dir', str(tmp_path))
    lines = [line for line in r.stderr.splitlines() if line.startswith('irepa.py: error: ')]
    assert r.returncode != 0 and len(lines) == 2 and len(set(lines)) == 1, r.stderr[-3000:]
    assert 'at step 2: stopping' in lines[0] and 'terminate called' not in r.stderr

def test_demo_trains_and_leaves_the_defaults_alone(tmp_path, capsys):
    run_dir = irepa.main(['--setting', 'demo', '--max-steps', '2', '--results-dir', str(tmp_path)])
    ck = load_last(run_dir)
    assert ck['args']['projector'] == 'conv' and ck['args']['sampler']['cfg_scale'] == 4.0
    assert f"python sample.py --ckpt {run_dir}" in capsys.readouterr().out
    args = irepa.get_args([])
    assert args.setting == 'latent' and args.model == 'SiT-XL/2' and args.lr == 1e-4 and args.vae

def test_recipes_resolve_and_explicit_flags_win():
    a = irepa.get_args([])                                                  # latent: REPA's / iREPA's LDM recipe
    assert (a.pred, a.time_dist, tuple(a.betas), a.clip_grad, a.hflip, a.ema_decay) == ('v', None, (0.9, 0.999),
                                                                                           1.0, False, 0.9999)
    assert a.proj_coeff == 0.5 and a.spnorm_gamma == 0.6 and a.global_batch_size == 256 and a.image_size == 256
    assert irepa.get_args(['--irepa']).proj_coeff == 1.0                    # configs/irepa.yaml
    assert irepa.get_args(['--irepa', '--proj-coeff', '0.3']).proj_coeff == 0.3
    p = irepa.get_args(['--setting', 'pixel'])                              # JiT's recipe on SiT
    assert (p.model, p.pred, tuple(p.time_dist), tuple(p.betas), p.clip_grad, p.hflip) == (
        'SiT-B/16', 'x', (0.8, 0.8), (0.9, 0.95), None, True)
    assert (p.warmup_epochs, p.spnorm_gamma, p.proj_coeff, p.vae) == (5, 0.8, 0.5, None)
    assert p.lr == 5e-5 and irepa.get_args(['--setting', 'pixel', '--global-batch-size', '1024']).lr == 2e-4
    assert irepa.get_args(['--setting', 'pixel', '--lr', '1e-3']).lr == 1e-3
    assert p.sampler == dict(mode='ode', heun=True, num_steps=50, cfg_scale=1.0)
    assert irepa.get_args(['--setting', 'demo', '--no-irepa']).irepa is False

def test_precision_follows_the_cpu_and_the_environment(monkeypatch):
    cpu = torch.device('cpu')
    monkeypatch.delenv('IREPA_PRECISION', raising=False)
    monkeypatch.setattr(runs, 'cpu_has_bf16', lambda: True)
    assert irepa.precision(cpu) == 'bf16' and irepa.autocast(cpu)._enabled
    with irepa.autocast(cpu):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    monkeypatch.setattr(runs, 'cpu_has_bf16', lambda: False)
    assert irepa.precision(cpu) == 'fp32' and not irepa.autocast(cpu)._enabled
    monkeypatch.setenv('IREPA_PRECISION', 'bf16')
    assert irepa.precision(cpu) == 'bf16'
    monkeypatch.setattr(runs, 'cpu_has_bf16', lambda: True)
    monkeypatch.setenv('IREPA_PRECISION', 'fp32')
    assert irepa.precision(cpu) == 'fp32'
    with irepa.autocast(cpu):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    assert irepa.precision(torch.device('mps')) == 'fp32'
    monkeypatch.setenv('IREPA_PRECISION', 'fp16')
    with pytest.raises(SystemExit, match='IREPA_PRECISION=fp16: use auto, bf16 or fp32'):   # one line, no traceback
        irepa.precision(cpu)

def test_losses_are_float32_under_bf16_autocast():
    model = tiny(target_dim=8)
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        d, a = irepa.flow_matching_loss(model, x, torch.tensor([0, 1]), torch.randn_like(x), torch.rand(2),
                                        torch.randn(2, 16, 8))
    assert d.dtype == a.dtype == torch.float32

def test_logit_normal_time_is_jits_in_this_convention():
    g = torch.Generator().manual_seed(0)
    n = torch.randn(200_000, generator=g)
    t = irepa.sample_time(torch.rand(200_000, generator=g), n, (0.8, 0.8))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.8) < 0.01 and abs(logit.std() - 0.8) < 0.01
    assert (t > 0.5).float().mean() > 0.8                                  # mostly noisy times (t = 1 is noise)
    u = torch.rand(5)
    assert torch.equal(irepa.sample_time(u, n[:5], None), u)               # REPA: uniform

def test_pixel_recipe_warms_up_the_lr_and_does_not_clip(tmp_path, monkeypatch):
    """JiT: lr rises linearly from 0 over 5 epochs; no gradient clipping. Checked on AdamW's first update:
    with lr 0 at step 0 nothing moves; at step 1 of a 2-step warm-up each weight moves by about lr / 2."""
    seen = []
    orig = torch.optim.AdamW.step
    def spy(self, *a, **k):
        seen.append([g['lr'] for g in self.param_groups][0])
        return orig(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, 'step', spy)
    monkeypatch.setattr(data.Shapes, '__len__', lambda self: 16)           # 2 steps per epoch at batch 8
    run = irepa.main(['--setting', 'pixel', '--model', 'SiT-T/4', '--image-size', '16', '--encoder', 'none',
                      '--global-batch-size', '8', '--max-steps', '12', '--log_every=100', '--num-workers', '0',
                      '--results-dir', str(tmp_path)])
    lr = 5e-5 * 8 / 256
    assert seen == pytest.approx([lr * s / 10 for s in range(10)] + [lr, lr])
    ck = load_last(run)
    assert ck['args']['clip_grad'] is None and ck['args']['pred'] == 'x'

def test_clip_grad_follows_the_recipe(monkeypatch, tmp_path):
    norms = []
    orig = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', lambda p, m, *a, **k: norms.append(m) or orig(p, m, *a, **k))
    run_train(tmp_path / 'a', '--encoder', 'none', '--max-steps', '1')
    irepa.main(['--setting', 'pixel', '--model', 'SiT-T/4', '--image-size', '16', '--encoder', 'none',
                '--global-batch-size', '8', '--max-steps', '1', '--num-workers', '0', '--results-dir', str(tmp_path / 'b')])
    assert norms == [1.0, float('inf')]

# -----------------------------------------------------------------------------
# The latent setting: SD-VAE latents (a random-weight VAE in a temporary $TORCH_HOME, no network)


LATENT = ['--setting', 'latent', '--model', 'SiT-T/2', '--image-size', '64', '--encoder', 'hog', '--irepa',
          '--global-batch-size', '4', '--num-workers', '0', '--log_every=1']

def test_latent_training_resume_and_sampling(tmp_path, vae_home, monkeypatch):
    import sample
    monkeypatch.setenv('TORCH_HOME', vae_home)
    run = irepa.main(LATENT + ['--max-steps', '1', '--results-dir', str(tmp_path)])
    ck = load_last(run)
    a = ck['args']
    assert (a['vae'], a['input_size'], a['in_channels'], a['proj_coeff'], a['spnorm_gamma']) == (
        'sd-vae-ft-mse', 8, 4, 1.0, 0.6)                                     # 64 px -> 8x8x4 latents; iREPA LDM recipe
    assert ck['model']['x_embedder.proj.weight'].shape[1] == 4
    resumed = irepa.main(['--resume', run, '--max-steps', '2'])
    assert load_last(resumed)['step'] == 2
    out = sample.main(['--ckpt', run, '--num-steps', '2', '--num-samples', '2', '--out', str(tmp_path / 's')])
    arr = np.load(os.path.join(out, 'samples.npz'))['arr_0']
    assert arr.shape == (2, 64, 64, 3) and arr.dtype == np.uint8             # decoded back to pixels
    import metrics                                                          # SiT's features of VAE-encoded images
    for i in range(4):
        os.makedirs(tmp_path / 'imgs' / 'c', exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            tmp_path / 'imgs' / 'c' / f'{i}.png')
    vals = metrics.main(['--ckpt', runs.latest_checkpoint(run), '--data-path', str(tmp_path / 'imgs'),
                         '--num-workers', '0', '--batch-size', '2'])
    assert 'SiT h (block 2, t=0.5)' in vals and len(vals['SiT h (block 2, t=0.5)']['lds']) == 4

def test_latents_are_a_normalised_posterior_sample(vae_home, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', vae_home)
    lat = vae.SDVAE('cpu')
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    eps = torch.randn(2, 4, 2, 2)
    mean, logvar = lat.vae.encode(x)
    scale, bias = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(1, 4, 1, 1), torch.tensor([0.1, 0.0, -0.1, 0.2]).view(1, 4, 1, 1)
    torch.testing.assert_close(lat.encode(x, eps), (mean + torch.exp(0.5 * logvar) * eps - bias) * scale)
    z = torch.randn(2, 4, 2, 2)
    torch.testing.assert_close(lat.decode(z), lat.vae.decode(z / scale + bias))

def test_latent_setting_without_the_vae_files_says_where_to_put_them(tmp_path, monkeypatch, capsys):
    import vae
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty_home'))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', lambda *a, **k: (_ for _ in ()).throw(OSError('offline')))
    with pytest.raises(SystemExit) as e:
        irepa.main(LATENT + ['--max-steps', '1', '--results-dir', str(tmp_path)])
    msg = str(e.value.code)
    assert vae.VAE_FILE in msg and vae.STATS_FILE in msg and 'empty_home' in msg and '\n' not in msg



# -----------------------------------------------------------------------------
# The training recipe, line by line: what reaches the loss, the gradient, the optimizer and the EMA

def test_grad_accum_gives_the_gradient_of_the_batch_mean(tmp_path, monkeypatch, fp32):
    """--grad-accum micro-batches give the gradient of the whole batch's mean loss (each loss scaled by 1/n):
    the gradient main() hands to the clipping, on the first step (the same initial weights), before the
    clipping and Adam could hide a scale error."""
    seen, clip = [], torch.nn.utils.clip_grad_norm_
    def spy(params, max_norm):
        params = list(params)
        seen.append([p.grad.clone() for p in params if p.grad is not None])
        return clip(params, max_norm)
    monkeypatch.setattr(torch.nn.utils, 'clip_grad_norm_', spy)
    logs = []
    for n in (1, 2, 4):
        run = run_train(tmp_path / str(n), '--encoder', 'hog', '--irepa', '--max-steps', '1', '--grad-accum', str(n))
        logs.append(open(os.path.join(run, 'log.txt')).read().split('step 1/1 | ')[1].split(' | grad')[0])
    assert len(seen) == 3 and len(seen[0]) > 10
    for g in seen[1:]:
        for gi, ri in zip(g, seen[0]):
            torch.testing.assert_close(gi, ri, atol=1e-6, rtol=1e-5)
    assert logs[0] == logs[1] == logs[2]                                   # loss (fm, align): the batch's means

def spy_training(monkeypatch, tmp_path, *argv):
    """Run irepa.main and record what every micro-batch hands to the loss."""
    seen = []
    orig = irepa.flow_matching_loss
    def spy(model, x, y, noise, t, z=None, pred='v'):
        seen.append(dict(x=x.detach().clone(), y=y.clone(), noise=noise.clone(), t=t.clone(),
                         z=None if z is None else z.clone(), pred=pred))
        return orig(model, x, y, noise, t, z, pred)
    monkeypatch.setattr(irepa, 'flow_matching_loss', spy)
    run = irepa.main(['--model', 'SiT-T/4', '--image-size', '16', '--num-workers', '0', '--log_every=100',
                      '--results-dir', str(tmp_path), *argv])
    return run, {k: [s[k] for s in seen] for k in seen[0]}

def test_what_reaches_the_loss_demo_recipe(monkeypatch, tmp_path):
    run, seen = spy_training(monkeypatch, tmp_path, '--setting', 'demo', '--global-batch-size', '64',
                             '--max-steps', '6', '--encoder', 'hog', '--irepa')
    y = torch.cat(seen['y'])
    frac_null = (y == 4).float().mean().item()                              # null class = num_classes = 4
    assert 0.05 < frac_null < 0.16                                          # label dropout p = 0.1 (384 labels)
    t, noise = torch.cat(seen['t']), torch.cat(seen['noise'])
    assert t.min() >= 0 and t.max() < 1 and abs(t.mean() - 0.5) < 0.05    # U[0, 1)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
    z = torch.cat(seen['z'])                                               # iREPA: spatially normalised targets
    torch.testing.assert_close(z.std(dim=1), torch.ones(z.shape[0], z.shape[2]), atol=1e-3, rtol=0)
    x = seen['x'][0]                                                        # step 0: the dataset's images in [-1, 1]
    ds = data.Shapes(50_000, 16, seed=0)
    idx = irepa.global_batches(len(ds), 64, 0, 0)[0]
    ref = torch.stack([ds[i][0] for i in idx]).float() / 127.5 - 1
    torch.testing.assert_close(x, ref)                                      # no flips in the demo recipe
    # the EMA after the first step: decay * initial + (1 - decay) * the stepped model, exactly
    ck = torch.load(runs.latest_checkpoint(run), weights_only=False)
    assert ck['args']['ema_decay'] == 0.995

def test_each_run_seed_draws_its_own_t_and_noise(monkeypatch, tmp_path):
    # torch's CPU generator keeps only the low 32 bits of a seed: seed * 2**32 + step gave every seed the same draws
    draw = lambda s: torch.rand(4, generator=torch.Generator().manual_seed(s))
    assert torch.equal(draw(2 ** 32 + 5), draw(5))
    seeds = {irepa.step_seed(s, k) for s in range(3) for k in range(1000)}
    assert len(seeds) == 3000                                               # no two (seed, step) share a generator
    seen = {s: spy_training(monkeypatch, tmp_path / str(s), '--setting', 'demo', '--global-batch-size', '8',
                            '--max-steps', '1', '--encoder', 'none', '--seed', str(s))[1] for s in (0, 1)}
    assert not torch.equal(seen[0]['t'][0], seen[1]['t'][0])
    assert not torch.equal(seen[0]['noise'][0], seen[1]['noise'][0])

def test_ema_is_one_exact_update_per_step(tmp_path):
    run = run_train(tmp_path, '--encoder', 'none', '--max-steps', '1', '--ckpt-every', '1')
    ck = load_last(run)
    torch.manual_seed(0)
    init = irepa.build_model(ck['args']).state_dict()                       # the same seeded initial weights
    d = ck['args']['ema_decay']
    for k, v in ck['ema'].items():
        if k != 'pos_embed':
            torch.testing.assert_close(v, d * init[k] + (1 - d) * ck['model'][k], atol=1e-7, rtol=1e-6)
    assert not torch.equal(ck['ema']['final_layer.linear.weight'], ck['model']['final_layer.linear.weight'])

def test_what_reaches_the_loss_pixel_recipe(monkeypatch, tmp_path):
    run, seen = spy_training(monkeypatch, tmp_path, '--setting', 'pixel', '--global-batch-size', '64',
                             '--max-steps', '4', '--encoder', 'hog', '--no-irepa')
    t = torch.cat(seen['t'])
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.8) < 0.15 and abs(logit.std() - 0.8) < 0.15   # JiT's logit-normal, 256 draws
    assert set(seen['pred']) == {'x'}
    z = torch.cat(seen['z'])                                               # REPA: the raw HOG tokens
    assert (z.std(dim=1) - 1).abs().max() > 0.2
    ds = data.Shapes(50_000, 16, seed=0)
    flipped = 0
    for step in range(4):                                                   # flips: about half the images
        idx = irepa.global_batches(len(ds), 64, 0, 0)[step]
        for i, x in zip(idx, seen['x'][step]):
            img = ds[i][0].float() / 127.5 - 1
            same, flip = torch.equal(x, img), torch.equal(x, img.flip(-1))
            assert same or flip
            flipped += flip and not same
    assert 90 < flipped < 166                                               # 256 images, p = 0.5

def test_optimizer_settings_follow_the_recipe(monkeypatch, tmp_path):
    made = []
    orig = torch.optim.AdamW.__init__
    def spy(self, params, **kw):
        made.append(kw)
        orig(self, params, **kw)
    monkeypatch.setattr(torch.optim.AdamW, '__init__', spy)
    run_train(tmp_path / 'a', '--encoder', 'none', '--max-steps', '1')
    irepa.main(['--setting', 'pixel', '--model', 'SiT-T/4', '--image-size', '16', '--encoder', 'none',
                '--global-batch-size', '8', '--max-steps', '1', '--num-workers', '0', '--results-dir', str(tmp_path / 'b')])
    assert [(k['lr'], tuple(k['betas']), k['weight_decay'], k['eps']) for k in made] == [
        (1e-3, (0.9, 0.999), 0, 1e-8), (5e-5 * 8 / 256, (0.9, 0.95), 0, 1e-8)]

def keys_cubic_resize(x, size, a=-0.75):
    """Reference: separable cubic convolution (Keys 1981, a = -0.75 as PyTorch), half-pixel centres, edge clamp."""
    def weights(s):
        s = abs(s)
        return ((a + 2) * s ** 3 - (a + 3) * s ** 2 + 1) if s <= 1 else (a * s ** 3 - 5 * a * s ** 2 + 8 * a * s - 4 * a
                                                                         if s < 2 else 0.0)
    def resize_1d(v, n):                                                    # v: (..., m) -> (..., n)
        m = v.shape[-1]
        out = []
        for i in range(n):
            c = (i + 0.5) * m / n - 0.5
            f = math.floor(c)
            out.append(sum(weights(c - j) * v[..., min(max(j, 0), m - 1)] for j in range(f - 1, f + 3)))
        return torch.stack(out, -1)
    return resize_1d(resize_1d(x, size).transpose(-1, -2), size).transpose(-1, -2)

def test_dinov2_input_is_bicubic_resized_to_14_x_grid(hub_dir):
    enc = irepa.load_encoder('dinov2_vits14', grid_size=2, hub_repo=hub_dir)
    seen = {}
    enc.model.patch_embed.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 20, 20, generator=g, dtype=torch.float64).float() * 255   # 20 px -> 28 px
    enc(img)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = keys_cubic_resize(((img / 255 - mean) / std).double(), 28).float()
    torch.testing.assert_close(seen['x'], want, atol=1e-4, rtol=1e-4)

def test_bench_prints_both_precisions_and_the_speed_up():
    r = subprocess.run([sys.executable, 'bench.py', '--model', 'SiT-T/2', '--image-size', '16', '--batch-size', '4',
                        '--repeats', '1', '--warmup', '0'], capture_output=True, text=True, timeout=300, cwd=HERE)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [l.split(':')[0].strip() for l in lines if 'ms/step' in l] == ['fp32', 'bf16']
    assert 'bf16 speed-up:' in lines[-1] and float(lines[-1].split(':')[1].strip().rstrip('x')) > 0

def test_bench_flops_count_per_token_and_per_image_weights():
    import bench
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device('meta'):                                             # no memory: only the shapes count
        xl = irepa.SiT_models['SiT-XL/2'](input_size=32, in_channels=4, num_classes=1000)
    assert abs(bench.forward_flops(xl, 256) / 2 - 118.6e9) < 0.05e9       # DiT-XL/2: 118.6 Gflops (DiT, Table 4)
    for mean_flow in (False, True):                                          # MeanFlow: + the interval's MLP
        model = tiny(target_dim=8, projector='conv', sit=meanflow.MeanFlowSiT if mean_flow else irepa.SiT)   # 4x4 tokens
        # under CPU autocast, attention is explicit matmuls, which the counter sees (SDPA's CPU kernel it does not)
        with FlopCounterMode(display=False) as counter, torch.autocast('cpu', dtype=torch.bfloat16):
            model(torch.randn(3, 3, 16, 16), torch.rand(3), torch.tensor([0, 1, 2]), *[torch.rand(3)][:mean_flow])
        assert counter.get_total_flops() == 3 * bench.forward_flops(model, model.grid_size ** 2)

# -----------------------------------------------------------------------------
# Pinned by hand: what the paper's result depends on (the aligned layer, a target registered with its image, the
# loss and the loop, the defaults a user gets), each against loops or closed forms, not against the code's output

def randomised(model, std=0.1, seed=0):
    """`model` with every trainable weight drawn from N(0, std^2): at the adaLN-Zero init every block is the identity,
    so the output of any block would pass a test of which one is aligned."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * std
    return model

def test_aligned_state_is_the_output_of_block_encoder_depth_before_any_norm():
    """REPA aligns the residual stream right after block `encoder_depth` (counting from 1), before any norm (SPEC 3).
    For every depth, against the blocks run by hand (projector replaced by the identity, so h_proj is the raw state);
    metrics.py reads the same state through trained.hidden_state. The output runs every block and the final layer."""
    depth = 4
    x, t, y = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0.3, 0.8]), \
        torch.tensor([1, 5])
    for k in range(1, depth + 1):
        model = randomised(tiny(depth=depth, encoder_depth=k, target_dim=8))
        model.projectors = torch.nn.ModuleList([torch.nn.Identity()])
        h = model.x_embedder(x) + model.pos_embed                              # (B, T, D)
        c = model.t_embedder(t) + model.y_embedder.embedding_table.weight[y]   # (B, D)
        states = []
        for block in model.blocks:
            h = block(h, c)
            states.append(h)
        out, h_proj = model(x, t, y)
        torch.testing.assert_close(h_proj, states[k - 1])
        assert all((states[j] - states[k - 1]).abs().max() > 0.01 for j in range(depth) if j != k - 1)  # teeth
        h_state, h_state_proj = trained.hidden_state(model, x, t, y)
        torch.testing.assert_close(h_state, states[k - 1])
        torch.testing.assert_close(h_state_proj, states[k - 1])
        torch.testing.assert_close(out, model.unpatchify(model.final_layer(states[-1], c)))

def test_patch_embedding_and_unpatchify_follow_raster_order():
    """SiT's token r * G + c is image patch (r, c) (the patch embedding is a conv applied patch by patch), and the
    final layer's p * p * C outputs of that token fill patch (r, c) in DiT's (row i, column j, channel) order, so
    official checkpoints decode as they were trained. Both by explicit loops."""
    torch.manual_seed(0)
    model, p, G, C = tiny(), 4, 4, 3
    x = torch.randn(2, C, 16, 16)
    tokens = model.x_embedder(x)                                               # (B, T, D)
    w, b = model.x_embedder.proj.weight, model.x_embedder.proj.bias
    for r in range(G):
        for c in range(G):
            patch = x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p]
            torch.testing.assert_close(tokens[:, r * G + c], torch.einsum('bkij,okij->bo', patch, w) + b,
                                       atol=1e-5, rtol=1e-5)
    out = torch.randn(2, G * G, p * p * C)
    ref = torch.zeros(2, C, 16, 16)
    for r in range(G):
        for c in range(G):
            for i in range(p):
                for j in range(p):
                    for ch in range(C):
                        ref[:, ch, r * p + i, c * p + j] = out[:, r * G + c, (i * p + j) * C + ch]
    assert torch.equal(model.unpatchify(out), ref)

class PatchMeans(torch.nn.Module):
    """Stub encoder on a G x G grid: token r * G + c is the mean colour of image patch (r, c), by explicit loops.
    Records the images it is given."""
    def __init__(self, grid):
        super().__init__()
        self.grid, self.embed_dim, self.seen = grid, 3, []

    def forward(self, img):                                                    # (B, 3, S, S) in 0..255
        self.seen.append(img.clone())
        G, (B, _, S, _) = self.grid, img.shape
        p = S // G
        out = torch.zeros(B, G * G, 3)
        for b in range(B):
            for r in range(G):
                for c in range(G):
                    out[b, r * G + c] = img[b, :, r * p:(r + 1) * p, c * p:(c + 1) * p].mean(dim=(1, 2))
        return out

def inputs_settings(**kw):
    """The configuration training_inputs reads: a global batch of 8 images of 16 px, 5 classes, U[0, 1) times,
    flips."""
    args = dict(global_batch_size=8, seed=0, time_dist=None, hflip=True, spatial_norm=False, spnorm_gamma=0.6,
                objective='fm', in_channels=3, input_size=16, num_classes=5)
    args.update(kw)
    return argparse.Namespace(**args)

def step_inputs(images, labels, step, args, rank=0, world=1, encoder=None, sd_vae=None):
    from contextlib import nullcontext
    return irepa.training_inputs(images, labels, step, args, rank=rank, world=world,
                                 generator=torch.Generator(), sd_vae=sd_vae, encoder=encoder,
                                 mixed_precision=nullcontext())

def flips_of(seen, images):
    """Per sample: False if `seen` (B, 3, S, S) in 0..255 is the image, True if its horizontal mirror; else fail."""
    out = []
    for s, img in zip(seen, images.float()):
        out.append(not torch.allclose(s, img, atol=1e-3))
        if out[-1]:
            torch.testing.assert_close(s, img.flip(-1), atol=1e-3, rtol=0)
    return out

def test_target_is_registered_with_the_image_sit_trains_on():
    """The encoder sees exactly the image SiT is trained on, flips included, token for token in raster order: with a
    stub encoder of per-patch means, target token r * G + c is the mean of x's patch (r, c), and equals SiT's own token
    r * G + c (its patch embedding set to the per-channel patch mean). Flips are horizontal, some samples flipped."""
    images = torch.randint(0, 256, (8, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    args = inputs_settings()
    enc = PatchMeans(4)
    x, y, noise, t, target = step_inputs(images, torch.arange(8) % 5, 0, args, encoder=enc)
    pixels = (x + 1) * 127.5                                                   # what SiT sees, back in 0..255
    flipped = flips_of(pixels, images)
    assert any(flipped) and not all(flipped)
    for b in range(8):
        for r in range(4):
            for c in range(4):
                patch = pixels[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4]                # (3, p, p)
                torch.testing.assert_close(target[b, r * 4 + c], patch.mean((1, 2)), atol=1e-3, rtol=0)
    embed = irepa.PatchEmbed(4, 3, 3)                                          # SiT's tokenisation, as patch means
    embed.proj.weight.data = torch.eye(3).view(3, 3, 1, 1).expand(3, 3, 4, 4) / 16
    embed.proj.bias.data.zero_()
    torch.testing.assert_close((embed(x) + 1) * 127.5, target, atol=1e-3, rtol=0)
    b = flipped.index(True)                                                    # the unflipped image's targets differ
    assert (target[b] - PatchMeans(4)(images[b:b + 1].float())[0]).abs().max() > 10

def test_each_rank_gets_its_slice_of_the_global_batch():
    """Rank r of W gets slice r of what one process draws for the whole global batch: times, noise, label drops,
    flips and targets. So any world size trains the same. iREPA's targets are the encoder's tokens spatially
    normalised with the recipe's gamma: (z - gamma mean_T z) / (std_T z + 1e-6). Each step draws anew."""
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(8) % 5
    args = inputs_settings(spatial_norm=True, spnorm_gamma=0.8)
    enc = PatchMeans(4)
    full = step_inputs(images, labels, 3, args, encoder=enc)
    z = PatchMeans(4)(enc.seen[0])                                             # raw targets of the encoder's input
    torch.testing.assert_close(full[4], (z - 0.8 * z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6))
    for rank in (0, 1):
        part = step_inputs(images[4 * rank:4 * rank + 4], labels[4 * rank:4 * rank + 4], 3, args,
                           rank=rank, world=2, encoder=PatchMeans(4))
        for a, b in zip(full, part):
            torch.testing.assert_close(a[4 * rank:4 * rank + 4], b)
    _, _, noise, t, _ = step_inputs(images, labels, 4, args, encoder=PatchMeans(4))
    assert (t - full[3]).abs().min() > 0 and (noise - full[2]).abs().min() > 0

def test_step_draws_label_drop_flips_times_noise_and_pixel_scale():
    """Over 20,000 samples (tolerances ~5 standard errors): labels are replaced by the null class num_classes with
    p = LABEL_DROP = 0.1 and otherwise kept; half the images are mirrored, independently of the drops; t ~ U[0, 1);
    noise ~ N(0, 1); pixels map to [-1, 1] by /127.5 - 1 (0 -> -1, 51 -> -0.6, 204 -> 0.6, 255 -> 1)."""
    n = 20_000
    img = torch.tensor([[0, 255], [51, 204]], dtype=torch.uint8)               # left / right differ: a flip shows
    images, labels = img.expand(n, 3, 2, 2).clone(), torch.arange(n) % 5
    args = inputs_settings(global_batch_size=n, input_size=2)
    x, y, noise, t, target = step_inputs(images, labels, 0, args)
    assert target is None
    assert irepa.LABEL_DROP == 0.1
    dropped = y == 5
    assert torch.equal(y[~dropped], labels[~dropped])
    assert abs(dropped.double().mean().item() - 0.1) < 5 * (0.09 / n) ** 0.5
    ref = torch.tensor([[-1.0, 1.0], [-0.6, 0.6]])
    flipped = x[:, 0, 0, 0] == 1
    torch.testing.assert_close(x[~flipped], ref.expand(int((~flipped).sum()), 3, 2, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(x[flipped], ref.flip(-1).expand(int(flipped.sum()), 3, 2, 2), atol=1e-6, rtol=0)
    assert abs(flipped.double().mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5
    drop_if_flipped, drop_if_not = dropped[flipped].double().mean(), dropped[~flipped].double().mean()
    assert abs(drop_if_flipped - drop_if_not) < 5 * (0.09 / (n / 2) * 2) ** 0.5   # independent draws
    assert abs(torch.corrcoef(torch.stack([t, flipped.float()]))[0, 1]) < 5 / n ** 0.5
    assert t.min() >= 0 and t.max() < 1
    assert abs(t.mean() - 0.5) < 5 * (1 / 12 / n) ** 0.5 and abs(t.var() - 1 / 12) < 5 * (1 / 180 / n) ** 0.5
    assert noise.shape == (n, 3, 2, 2) and abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01

class PoolVAE:
    """Stub SD-VAE: the latent of an image in [-1, 1] is its 8x8 average pool (channel mean, repeated over 4
    channels) plus the posterior noise eps. Records its inputs."""
    def __init__(self):
        self.seen = []

    def encode(self, x, eps):
        self.seen.append((x.clone(), eps.clone()))
        return F.avg_pool2d(x, 8).mean(1, keepdim=True).expand(-1, 4, -1, -1) + eps

def test_latent_setting_encodes_the_same_image_the_encoder_sees():
    """In the latent setting SiT trains on the SD-VAE posterior sample of the [-1, 1] image, flipped like the
    alignment encoder's input, while the encoder sees the 0..255 pixel image itself, not the latents (SPEC 13);
    the posterior's eps is its own draw, not the flow's noise."""
    images = torch.randint(0, 256, (8, 3, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    args = inputs_settings(in_channels=4, input_size=2)
    enc, vae = PatchMeans(2), PoolVAE()
    x, y, noise, t, target = step_inputs(images, torch.arange(8) % 5, 0, args, encoder=enc, sd_vae=vae)
    (vae_in, eps), = vae.seen
    flipped = flips_of(enc.seen[0], images)
    assert any(flipped) and not all(flipped)
    torch.testing.assert_close(vae_in, enc.seen[0] / 127.5 - 1)
    assert eps.shape == noise.shape == x.shape == (8, 4, 2, 2) and not torch.equal(eps, noise)
    torch.testing.assert_close(x, F.avg_pool2d(vae_in, 8).mean(1, keepdim=True).expand(-1, 4, -1, -1) + eps)
    torch.testing.assert_close(target, PatchMeans(2)(enc.seen[0]))


class Recorder(torch.nn.Module):
    """Stub SiT: out = 0.5 * x_t; h_proj = x_t's 48 values per image as 12 tokens of 4 dims. Records its inputs."""
    def forward(self, x_t, t, y):
        self.seen = (x_t.clone(), t.clone(), y.clone())
        return 0.5 * x_t, x_t.reshape(len(x_t), 12, 4)

def test_flow_matching_loss_by_hand():
    """flow_matching_loss calls model(x_t, t, y) with x_t = (1 - t) x + t eps and t as drawn (in [0, 1], no x1000);
    v-prediction: mean over C, H, W of (out - (eps - x))^2, then over the batch; x-prediction: (x - x_hat)^2 /
    max(t, 0.05)^2; alignment: -cos(h_proj, target) per token, averaged. All written out here."""
    g = torch.Generator().manual_seed(0)
    x, eps, target = (torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g),
                      torch.randn(3, 12, 4, generator=g))
    t, y = torch.tensor([0.0, 0.25, 0.9]), torch.tensor([2, 0, 7])
    model = Recorder()
    denoise, align = irepa.flow_matching_loss(model, x, y, eps, t, target)
    x_t = torch.stack([(1 - t[b]) * x[b] + t[b] * eps[b] for b in range(3)])
    torch.testing.assert_close(model.seen[0], x_t)
    assert torch.equal(model.seen[1], t) and torch.equal(model.seen[2], y)
    per_sample = [((0.5 * x_t[b] - (eps[b] - x[b])) ** 2).mean() for b in range(3)]
    torch.testing.assert_close(denoise, sum(per_sample) / 3)
    h = x_t.reshape(3, 12, 4)
    cos = [(h[b, k] @ target[b, k]) / (h[b, k].norm() * target[b, k].norm()) for b in range(3) for k in range(12)]
    torch.testing.assert_close(align, -sum(cos) / 36)
    denoise, _ = irepa.flow_matching_loss(model, x, y, eps, t, None, pred='x')
    per_sample = [((x[b] - 0.5 * x_t[b]) ** 2).mean() / max(t[b].item(), 0.05) ** 2 for b in range(3)]
    torch.testing.assert_close(denoise, sum(per_sample) / 3)
    n = torch.tensor([0.0, 1.0, -2.0])                                         # JiT's logit-normal, in this convention
    torch.testing.assert_close(irepa.sample_time(torch.rand(3), n, (0.8, 0.8)), torch.sigmoid(0.8 + 0.8 * n))

def test_training_loop_by_hand(tmp_path, monkeypatch, fp32):
    """Two steps of the loop redone by hand: seeded init, the epoch's batches, training_inputs, loss = denoise +
    lambda * align, the gradient clipped to total norm 0.05 (small: it acts on every step, and AdamW's later steps see
    the clipped scale), AdamW, then EMA e <- d e + (1 - d) p with d = 0.9 from the stepped weights. Pins the clipping
    (value, place before the step) and the EMA (decay, order) that a one-step check or a spy on the call cannot."""
    import copy
    run = run_train(tmp_path, '--encoder', 'hog', '--irepa', '--max-steps', '2', '--ckpt-every', '2',
                    '--clip_grad=0.05', '--ema_decay=0.9', '--hflip=True')
    ck = load_last(run)
    a = ck['args']
    assert (a['clip_grad'], a['ema_decay'], a['proj_coeff'], a['encoder_depth'], a['hflip']) == (0.05, 0.9, 0.5, 2,
                                                                                                 True)
    torch.manual_seed(a['seed'])
    model = irepa.build_model(a)
    ema = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0, eps=1e-8)
    enc, ds = irepa.load_encoder('hog', 4), data.Shapes(50_000, 16, seed=0)
    for step, idx in enumerate(irepa.global_batches(len(ds), 8, 0, 0)[:2]):
        images, labels = torch.stack([ds[i][0] for i in idx]), torch.tensor([ds[i][1] for i in idx])
        x, y, noise, t, target = step_inputs(images, labels, step, argparse.Namespace(**a), encoder=enc)
        denoise, align = irepa.flow_matching_loss(model, x, y, noise, t, target)
        (denoise + 0.5 * align).backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
        assert norm > 0.05
        for p in params:
            p.grad *= 0.05 / (norm + 1e-6)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.copy_(0.9 * e + 0.1 * p)
    for part, net in (('model', model), ('ema', ema)):
        for k, v in net.state_dict().items():
            torch.testing.assert_close(ck[part][k], v, atol=1e-6, rtol=1e-5, msg=f'{part} {k}')

def test_constructor_defaults_are_the_papers():
    """What a user building the parts directly gets (SPEC 2-5): iREPA's 3x3 conv (padding 1) through
    SiT(projector='conv') and ConvProjector; REPA's MLP 2048 wide through SiT and mlp_projector; spatial norm gamma
    0.6; label drop 0.1; SiT's default size XL/2 aligned after block 8; each size's depth, width, heads and alignment
    depth (4 for 12 blocks, 8 for L/XL); MLP ratio 4 with tanh GELU."""
    with torch.device('meta'):
        conv_sit, mlp_sit = irepa.SiT(target_dim=768, projector='conv'), irepa.SiT(target_dim=768)
    conv = conv_sit.projectors[0]
    assert (conv.kernel_size, conv.padding, conv.in_channels, conv.out_channels) == ((3, 3), (1, 1), 1152, 768)
    assert (irepa.ConvProjector(16, 8).kernel_size, irepa.ConvProjector(16, 8).padding) == ((3, 3), (1, 1))
    assert (conv_sit.patch_size, len(conv_sit.blocks), conv_sit.encoder_depth, conv_sit.num_classes) == (2, 28, 8, 1000)
    assert conv_sit.pred == 'v' and conv_sit.blocks[0].attn.num_heads == 16
    assert conv_sit.blocks[0].mlp.fc1.out_features == 4 * 1152 and conv_sit.blocks[0].mlp.act.approximate == 'tanh'
    linear = lambda seq: [(type(m).__name__, tuple(m.weight.shape) if hasattr(m, 'weight') else None) for m in seq]
    assert linear(mlp_sit.projectors[0]) == [('Linear', (2048, 1152)), ('SiLU', None), ('Linear', (2048, 2048)),
                                             ('SiLU', None), ('Linear', (768, 2048))]
    assert linear(irepa.mlp_projector(32, 8)) == [('Linear', (2048, 32)), ('SiLU', None), ('Linear', (2048, 2048)),
                                                 ('SiLU', None), ('Linear', (8, 2048))]
    z = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(0))
    want = (z - 0.6 * z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6)
    torch.testing.assert_close(irepa.spatial_norm(z), want)
    assert irepa.LABEL_DROP == 0.1
    sizes = {s: (c['depth'], c['hidden_size'], c['num_heads'], c['encoder_depth']) for s, c in irepa.SiT_sizes.items()}
    assert {s: v for s, v in sizes.items() if s != 'T'} == {'S': (12, 384, 6, 4), 'B': (12, 768, 12, 4),
                                                            'L': (24, 1024, 16, 8), 'XL': (28, 1152, 16, 8)}
    with torch.device('meta'):
        for name, depth in (('SiT-S/2', 4), ('SiT-B/4', 4), ('SiT-L/2', 8), ('SiT-XL/2', 8)):
            assert irepa.SiT_models[name](input_size=32, num_classes=10).encoder_depth == depth

def test_recipes_are_the_spec_values():
    """The recipes, entry by entry, against SPEC 8 and 13 (latent: REPA's / iREPA's LDM recipe) and 14 (pixel: JiT's
    recipe on SiT-B/16, aligned after SiT-B's block 4); --irepa switches exactly the projector and the spatial norm."""
    latent = dict(vae='sd-vae-ft-mse', model='SiT-XL/2', image_size=256, encoder='dinov2_vitb14', pred='v',
                  time_dist=None, lr=1e-4, betas=(0.9, 0.999), warmup_epochs=0, clip_grad=1.0, hflip=False,
                  ema_decay=0.9999, spnorm_gamma=0.6, proj_coeff=dict(repa=0.5, irepa=1.0), global_batch_size=256,
                  max_steps=400_000, ckpt_every=50_000, sampler=dict(mode='sde', num_steps=250, cfg_scale=1.0))
    pixel = dict(vae=None, model='SiT-B/16', image_size=256, encoder='dinov2_vitb14', pred='x', time_dist=(0.8, 0.8),
                 lr=None, base_lr=5e-5, betas=(0.9, 0.95), warmup_epochs=5, clip_grad=None, hflip=True,
                 ema_decay=0.9999, spnorm_gamma=0.8, proj_coeff=0.5, global_batch_size=256, max_steps=200_000,
                 sampler=dict(mode='ode', heun=True, num_steps=50, cfg_scale=1.0))
    for name, want in (('latent', latent), ('pixel', pixel)):
        assert {k: irepa.RECIPES[name][k] for k in want} == want, name
    assert irepa.SiT_models['SiT-B/16'].keywords['encoder_depth'] == 4
    for argv, proj, norm, coeff in (([], 'mlp', False, 0.5), (['--irepa'], 'conv', True, 1.0),
                                    (['--setting', 'pixel', '--irepa'], 'conv', True, 0.5)):
        a = irepa.get_args(argv)
        assert (a.projector, a.spatial_norm, a.proj_coeff) == (proj, norm, coeff), argv


@pytest.mark.parametrize('objective', ['fm', 'meanflow'])
@pytest.mark.parametrize('setting', list(irepa.RECIPES))
def test_irepa_builds_a_3x3_conv_projector_in_every_setting(setting, objective):
    """--irepa resolves, in every setting, to iREPA's 3x3 conv with padding 1 (official ldm's flag defaults to 1)."""
    a = irepa.get_args(['--setting', setting, '--irepa', '--objective', objective])
    assert (a.projector, a.proj_kernel, a.spatial_norm) == ('conv', 3, True), setting
    cfg = dict(vars(a), input_size=a.image_size // 8 if a.vae else a.image_size, in_channels=4 if a.vae else 3,
               num_classes=4 if setting == 'demo' else 1000, target_dim={'hog': 36}.get(a.encoder, 768),
               encoder_depth=irepa.SiT_models[a.model].keywords['encoder_depth'])
    with torch.device('meta'):                                              # XL/2 and B/16 without their weights
        conv = irepa.build_model(cfg).projectors[0]
    assert isinstance(conv, torch.nn.Conv2d)
    assert (conv.kernel_size, conv.padding, conv.out_channels) == ((3, 3), (1, 1), cfg['target_dim']), setting

def test_irepa_checkpoint_records_the_3x3_conv(tmp_path):
    """A demo --irepa run stores proj_kernel 3 in its args and a (.., 3, 3) conv weight, and rebuilds as such."""
    ck = load_last(run_train(tmp_path, '--encoder', 'hog', '--irepa', '--max-steps', '1'))
    assert (ck['args']['projector'], ck['args']['proj_kernel']) == ('conv', 3)
    for part in ('model', 'ema'):
        assert ck[part]['projectors.0.weight'].shape[-2:] == (3, 3), part
    conv = irepa.build_model(ck['args']).projectors[0]                     # what sample.py --ckpt builds
    assert (conv.kernel_size, conv.padding) == ((3, 3), (1, 1))
