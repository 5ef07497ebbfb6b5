"""
irepa.py -- REPA and iREPA in one file: SiT, flow matching, representation alignment, DDP training.

iREPA (arXiv 2512.10794) improves REPA (arXiv 2410.06940) with two changes, both set by `--irepa`:
a 3x3 conv projector instead of REPA's per-token MLP, and the spatial normalisation of the encoder's
patch tokens. Time: t = 0 is data, t = 1 is noise, x_t = (1 - t) x + t noise, velocity noise - x.
Sections 1-6: the method, in the paper's order; 7-10: training. What a first reading can skip is
in sibling files, called by name: runs.py (errors, checks, checkpoints, resume), data.py, hog.py,
vae.py (the SD-VAE), meanflow.py. Settings (section 7): latent (the paper's), pixel, demo.

    python irepa.py --setting demo          # CPU, ~3 min; then python sample.py --ckpt results/...
    torchrun --nproc_per_node=8 irepa.py --encoder dinov2_vitb14 --irepa --data-path imagenet/train
    (one GPU: python irepa.py ...; multi-node: torchrun --nnodes=N --node_rank=R --master_addr=...)
    ... --setting pixel | --objective meanflow | --spnorm_gamma=0.8 (any recipe key: --key=value)
"""
import argparse
import copy
import math
import os
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import hog
import runs

# -----------------------------------------------------------------------------
# 1. SiT's parts (DiT, arXiv 2212.09748; SiT, arXiv 2401.08740), named as in the official code.

def modulate(x, shift, scale):
    # adaLN: x (B, T, D), shift/scale (B, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

def sincos_1d(dim, pos):
    """MAE's 1-D embedding: pos (M,) -> (M, dim) = [sin(pos w), cos(pos w)], w = 1/10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

def sincos_2d(dim, grid_size):
    """(grid_size**2, dim) in raster order: dim/2 channels from the column, dim/2 from the row."""
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing='ij')
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)

class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) tokens in raster order, T = (H/p) * (W/p)."""
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)

class TimestepEmbedder(nn.Module):
    """t in [0, 1] (no x1000) -> cos and sin of 128 frequencies -> MLP -> (B, D)."""
    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.freq_dim // 2
        i = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(10000) * i / half)
        args = t.float()[:, None] * freqs[None]                                 # (B, 128)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)             # (B, 256)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))

class LabelEmbedder(nn.Module):
    """Class label -> (B, D); row `num_classes` is CFG's null class. training_inputs drops labels,
    so that model(x, t, y) is deterministic."""
    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)

def attention(q, k, v):
    """softmax(q k^T / sqrt(hs)) v: the fused kernel, but explicit on a CPU under bf16 autocast
    (faster at SiT's lengths, bench.py)."""
    if q.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
        att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5                   # (B, nh, T, T)
        return att.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v         # softmax in fp32
    return F.scaled_dot_product_attention(q, k, v)

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                    # (B, nh, T, hs)
        x = attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))

class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate='tanh')
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the condition c gives each branch's shift, scale, gate."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x

class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

# -----------------------------------------------------------------------------
# 2. Projectors: REPA's MLP and iREPA's conv (REPA 3.2; iREPA 4, official ldm/models/sit.py)

def tokens_to_grid(x):
    """(B, T, D) raster-order tokens -> (B, D, H, W) with H = W = sqrt(T)."""
    B, T, D = x.shape
    H = math.isqrt(T)
    assert H * H == T, f"{T} tokens do not form a square grid"
    return x.transpose(1, 2).reshape(B, D, H, H)

def grid_to_tokens(x):
    """(B, D, H, W) -> (B, H*W, D) in raster order (row by row)."""
    return x.flatten(2).transpose(1, 2)

def mlp_projector(hidden_size, target_dim, proj_dim=2048):
    """REPA: the same 3-layer MLP applied to every token independently; it cannot see neighbours."""
    return nn.Sequential(nn.Linear(hidden_size, proj_dim), nn.SiLU(),
                         nn.Linear(proj_dim, proj_dim), nn.SiLU(),
                         nn.Linear(proj_dim, target_dim))

class ConvProjector(nn.Conv2d):
    """iREPA: one 3x3 conv on the token grid, so each projected token mixes its 8 neighbours."""
    def __init__(self, hidden_size, target_dim, kernel_size=3):
        super().__init__(hidden_size, target_dim, kernel_size, padding=kernel_size // 2)

    def forward(self, x):                                                       # x (B, T, D)
        return grid_to_tokens(super().forward(tokens_to_grid(x)))              # (B, T, target_dim)

# -----------------------------------------------------------------------------
# 3. SiT itself, and the size table

def xavier_linears(module):
    """DiT's init of every nn.Linear in `module`: xavier-uniform weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return module

class SiT(nn.Module):
    """model(x, t, y) -> (out, h_proj): out like x (the velocity, or the clean image for pred='x'),
    h_proj (B, T, target_dim) the projected hidden state after block encoder_depth, or None."""
    def __init__(self, input_size=32, patch_size=2, in_channels=3, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, num_classes=1000, encoder_depth=8, target_dim=None,
                 projector='mlp', pred='v', proj_kernel=3):
        super().__init__()
        assert input_size % patch_size == 0, \
            f"image size {input_size} is not divisible by patch size {patch_size}"
        assert 1 <= encoder_depth <= depth, \
            f"encoder_depth must be in [1, {depth}], got {encoder_depth}"
        assert projector in ('mlp', 'conv') and pred in ('v', 'x')
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.grid_size = input_size // patch_size
        self.num_classes = num_classes
        self.encoder_depth, self.pred = encoder_depth, pred
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        pos = torch.tensor(sincos_2d(hidden_size, self.grid_size), dtype=torch.float32)
        self.pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)    # fixed, not learned
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.projectors = None
        self.initialize_weights()
        self.add_projector(hidden_size, target_dim, projector, proj_kernel)

    def add_projector(self, hidden_size, target_dim, projector, proj_kernel):
        """Built last: a seed gives the same SiT with any projector. A list of one, as in the
        official code, whose checkpoints then load (projectors.0.*). The MLP gets DiT's init, the
        conv torch's default."""
        if target_dim is None:
            return
        if projector == 'mlp':
            proj = xavier_linears(mlp_projector(hidden_size, target_dim))
        else:
            proj = ConvProjector(hidden_size, target_dim, proj_kernel)
        self.projectors = nn.ModuleList([proj])

    def initialize_weights(self):
        xavier_linears(self)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_init = [b.adaLN_modulation[-1] for b in self.blocks]
        zero_init += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zero_init:                     # adaLN-Zero: the blocks start as the identity
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        B, T, _ = x.shape                                                       # (B, T, p*p*C)
        p, C, h = self.patch_size, self.in_channels, self.grid_size
        x = x.view(B, h, h, p, p, C)
        return torch.einsum('bhwpqc->bchpwq', x).reshape(B, C, h * p, h * p)     # (B, C, H, W)

    def embed(self, x, t, y):
        """The tokens (B, T, D) and the condition c = t_emb + y_emb (B, D)."""
        return self.x_embedder(x) + self.pos_embed, self.t_embedder(t) + self.y_embedder(y)

    def project(self, h):
        return None if self.projectors is None else self.projectors[0](h)

    def forward(self, x, t, y):
        return self.trunk(*self.embed(x, t, y))

    def trunk(self, h, c):
        """The blocks and the final layer on tokens h (B, T, D) under condition c (B, D)."""
        h_proj = None
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if i + 1 == self.encoder_depth:
                h_proj = self.project(h)                    # the residual stream, before any norm
        return self.unpatchify(self.final_layer(h, c)), h_proj

# name -> constructor; encoder_depth is REPA's choice per size (4 for 12-block models, 8 for L/XL;
# sihyun-yu/REPA issue #5). 'T' is tiny, for CPU demos and tests.
SiT_sizes = {'T': dict(depth=6, hidden_size=192, num_heads=3, encoder_depth=2),
             'S': dict(depth=12, hidden_size=384, num_heads=6, encoder_depth=4),
             'B': dict(depth=12, hidden_size=768, num_heads=12, encoder_depth=4),
             'L': dict(depth=24, hidden_size=1024, num_heads=16, encoder_depth=8),
             'XL': dict(depth=28, hidden_size=1152, num_heads=16, encoder_depth=8)}

SiT_models = {f'SiT-{s}/{p}': partial(SiT, patch_size=p, **cfg)
              for s, cfg in SiT_sizes.items() for p in ((2, 4) if s == 'T' else (2, 4, 8, 16))}

# -----------------------------------------------------------------------------
# 4. Frozen encoders: images (B, 3, H, W) in 0..255 -> patch tokens (B, T, D) on SiT's grid (REPA
#    section 4.1; official ldm/vision_encoder.py). The paper's torch.hub ViTs, and 'hog' (hog.py):
#    classical descriptors of pure spatial structure also help REPA (iREPA section 3).
HUB_FAMILIES = {'dinov2': 'facebookresearch/dinov2', 'dinov3': 'facebookresearch/dinov3',
                'dino': 'facebookresearch/dino'}
DINOV2 = [f'dinov2_vit{s}14{r}' for s in 'sblg' for r in ('', '_reg')]
DINOV3 = ['dinov3_vits16', 'dinov3_vitb16', 'dinov3_vitl16']
DINOV1 = ['dino_vits16', 'dino_vitb16']
ENCODERS = ('hog',) + tuple(DINOV2 + DINOV3 + DINOV1)

def hub_family(name):
    """'dinov2', 'dinov3' or 'dino' (DINOv1); another --hub-dir entry counts as DINOv2-like."""
    default = 'dino' if name in DINOV1 else 'dinov2'
    return next((f for f in ('dinov2', 'dinov3') if name.startswith(f + '_')), default)

def hub_load(name, hub_repo=None):
    """torch.hub, offline when possible: --hub-dir, else the hub's cache, else GitHub."""
    github = HUB_FAMILIES[hub_family(name)]
    cached = os.path.join(torch.hub.get_dir(), github.replace('/', '_') + '_main')
    local = hub_repo or (cached if os.path.isfile(os.path.join(cached, 'hubconf.py')) else None)
    kwargs = runs.gated_weights(name)                       # DINOv3's, put in the cache by hand
    with runs.hub_errors(name, hub_repo, local, github):    # one line, with an offline hint
        if local is not None:
            return torch.hub.load(local, name, source='local', **kwargs)
        return torch.hub.load(f'{github}:main', name, **kwargs)

class HubEncoder(nn.Module):
    """A torch.hub ViT with its family's preprocessing: ImageNet's mean and std, a resize to patch
    x grid so that its grid is SiT's (DINOv3: bilinear antialiased, else bicubic)."""
    def __init__(self, name, grid_size, hub_repo=None):
        super().__init__()
        self.name, self.grid_size, self.family = name, grid_size, hub_family(name)
        self.model = hub_load(name, hub_repo)
        self.resolution = runs.hub_patch_size(self.model, name) * grid_size
        self.embed_dim = self.model.embed_dim
        pe = getattr(self.model, 'pos_embed', None)                             # (1, 1 + N, D)
        if pe is not None and pe.shape[1] - 1 != grid_size ** 2:
            n = math.isqrt(pe.shape[1] - 1)
            grid = pe[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(grid_size, grid_size), mode='bicubic',
                                 antialias=True)
            patch_pos = grid_to_tokens(grid).to(pe.dtype)
            self.model.pos_embed = nn.Parameter(torch.cat([pe[:, :1], patch_pos], dim=1))
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

    def forward(self, img):                                                     # (B, 3, H, W)
        x, size = (img.float() - self.mean) / self.std, (self.resolution, self.resolution)
        # Resizing after the normalisation is the same (the resize weights sum to 1).
        if x.shape[-2:] != size:
            mode = 'bilinear' if self.family == 'dinov3' else 'bicubic'
            x = F.interpolate(x, size=size, mode=mode, antialias=self.family == 'dinov3',
                              align_corners=False)
        if self.family == 'dino':
            return self.model.get_intermediate_layers(x)[0][:, 1:]              # (B, T, D), no CLS
        return self.model.forward_features(x)['x_norm_patchtokens']             # (B, T, D)

def load_encoder(name, grid_size, hub_repo=None, device='cpu'):
    """A frozen encoder: eval mode, no gradients, .embed_dim; call it under torch.no_grad()."""
    if name == 'hog':
        enc = hog.HOG(grid_size)
    elif name in ENCODERS or hub_repo is not None:          # of the paper, or of --hub-dir
        enc = HubEncoder(name, grid_size, hub_repo)
    else:
        raise ValueError(f"unknown encoder '{name}'; choose one of: {', '.join(ENCODERS)}, "
                         f"or an entry of the hubconf.py in --hub-dir")
    return enc.to(device).eval().requires_grad_(False)

# -----------------------------------------------------------------------------
# 5. iREPA's spatial norm of the targets (iREPA section 4; official ldm/utils.py spatial_zscore)

def spatial_norm(target, gamma=0.6, eps=1e-6):
    """(target - gamma * mean_T) / (std_T + eps) over the tokens of (B, T, D) (gamma: the official
    zscore_alpha). Without the global component all patches share, what is left to align with is
    the contrast between patches: the spatial structure."""
    mean = target.mean(dim=1, keepdim=True)                                     # (B, 1, D)
    std = target.std(dim=1, keepdim=True)                                       # unbiased
    return (target - gamma * mean) / (std + eps)

# -----------------------------------------------------------------------------
# 6. Flow matching and alignment losses (SiT section 2; REPA eq. 8; official jit/denoiser.py)

def interpolant(x, noise, t):
    """x_t on the linear path (t = 0 data, t = 1 noise) and its velocity d x_t / dt."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x + t * noise, noise - x

def to_velocity(out, x_t, t, pred):
    """v, or (JiT) the velocity (x_t - x_hat) / t of a predicted clean image, t clamped at 0.05."""
    if pred == 'v':
        return out
    return (x_t - out) / t.clamp(min=0.05).view(-1, 1, 1, 1)

def alignment_loss(h_proj, target):
    """-cos(h_proj, target) averaged over tokens and batch, in float32 (fp16 gave NaNs,
    sihyun-yu/REPA issue #46). h_proj, target (B, T, D_enc)."""
    h_proj = F.normalize(h_proj.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return -(h_proj * target).sum(dim=-1).mean()

def flow_matching_loss(model, x, y, noise, t, target=None, pred='v'):
    """(denoise, align) of a batch x (B, C, H, W) in [-1, 1], t (B,), target (B, T, D_enc) or None.
    With x-prediction both velocities use the clamped t: ||x_hat - x||^2 / max(t, 0.05)^2."""
    x_t, v = interpolant(x, noise, t)
    out, h_proj = model(x_t, t, y)
    v_hat = to_velocity(out.float(), x_t, t, pred)
    if pred == 'x':
        v = to_velocity(x, x_t, t, pred)                    # noise - x for t >= 0.05
    denoise = ((v_hat - v) ** 2).mean(dim=(1, 2, 3)).mean()
    align = alignment_loss(h_proj, target) if target is not None else torch.zeros_like(denoise)
    return denoise, align

def sample_time(u, n, time_dist=None):
    """t ~ U[0, 1) (SiT, REPA) from draws u (B,), or with time_dist = (mean, std) JiT's logit-normal
    sigmoid(mean + std * n) from draws n (B,)."""
    if time_dist is None:
        return u
    mean, std = time_dist
    return torch.sigmoid(mean + std * n)

# -----------------------------------------------------------------------------
# 7. Settings: a recipe per setting (nanoGPT's config files, as dicts); the command line wins
#    (section 10). Every resolved value is logged and stored in the checkpoint.

RECIPES = {
    # The paper's: REPA's recipe on SD-VAE latents (iREPA Appendix G; official ldm/train.py and
    # configs; REPA 4.1): 256 px -> 32x32x4 latents -> a 16x16 grid; REPA's FID sampler.
    'latent': dict(vae='sd-vae-ft-mse', model='SiT-XL/2', image_size=256, encoder='dinov2_vitb14',
                   pred='v', time_dist=None, lr=1e-4, betas=(0.9, 0.999), warmup_epochs=0,
                   clip_grad=1.0, hflip=False, ema_decay=0.9999, spnorm_gamma=0.6,
                   proj_coeff=dict(repa=0.5, irepa=1.0), global_batch_size=256, max_steps=400_000,
                   ckpt_every=50_000, log_every=100, num_workers=4,
                   sampler=dict(mode='sde', num_steps=250, cfg_scale=1.0)),
    # Pixels with JiT's recipe (arXiv 2511.13720) on SiT, iREPA Table 10 (official jit/main_jit.py,
    # jit/configs/irepa.yaml): x-prediction, logit-normal t (JiT's P_mean -0.8 on its reversed time:
    # +0.8 here),
    # lr 5e-5 per 256 images after a 5-epoch warm-up; JiT-B/16's size; Heun 50 steps, no CFG.
    'pixel': dict(vae=None, model='SiT-B/16', image_size=256, encoder='dinov2_vitb14', pred='x',
                  time_dist=(0.8, 0.8), lr=None, base_lr=5e-5, betas=(0.9, 0.95), warmup_epochs=5,
                  clip_grad=None, hflip=True, ema_decay=0.9999, spnorm_gamma=0.8, proj_coeff=0.5,
                  global_batch_size=256, max_steps=200_000, ckpt_every=50_000, log_every=100,
                  num_workers=4, sampler=dict(mode='ode', heun=True, num_steps=50, cfg_scale=1.0)),
    # The CPU demo: 16 px shapes, HOG, iREPA, ~3 minutes on 2 cores (patch 4: 3x cheaper than 2).
    'demo': dict(vae=None, model='SiT-T/4', image_size=16, encoder='hog', irepa=True, pred='v',
                 time_dist=None, lr=2e-3, betas=(0.9, 0.999), warmup_epochs=0, clip_grad=1.0,
                 hflip=False, ema_decay=0.995, spnorm_gamma=0.6, proj_coeff=0.5,
                 global_batch_size=32, max_steps=1200, ckpt_every=1200, log_every=50, num_workers=0,
                 sampler=dict(mode='ode', heun=True, num_steps=25, cfg_scale=4.0)),
}
# iREPA's two changes follow --irepa unless set alone, --projector=conv or --spatial_norm=True
# (iREPA Table 2's ablation).
COMMON = dict(projector=None, spatial_norm=None, proj_kernel=3)

# -----------------------------------------------------------------------------
# 8. Processes and precision: the DDP set-up (torchrun), bf16 autocast

def setup_distributed():
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; otherwise one process on cuda, mps or cpu."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cuda = torch.cuda.is_available()
    if 'RANK' in os.environ:
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        device = torch.device('cuda', int(os.environ['LOCAL_RANK'])) if cuda else torch.device('cpu')
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl' if cuda else 'gloo')
        return rank, world, device
    return 0, 1, torch.device('cuda' if cuda else 'mps' if torch.backends.mps.is_available() else 'cpu')

def precision(device):
    """'bf16' on CUDA and CPUs with bf16 instructions, else 'fp32'; IREPA_PRECISION forces it."""
    want = os.environ.get('IREPA_PRECISION', 'auto')
    if want not in ('auto', 'bf16', 'fp32'):
        runs.fail(f"IREPA_PRECISION={want}: use auto, bf16 or fp32")
    if device.type not in ('cuda', 'cpu'):
        return 'fp32'
    if want == 'auto':
        return 'bf16' if device.type == 'cuda' or runs.cpu_has_bf16() else 'fp32'
    return want

def autocast(device):
    """bf16 autocast or nothing; losses are reduced in float32 either way."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision(device) == 'bf16')

# -----------------------------------------------------------------------------
# 9. The training loop (REPA's, DiT's, nanoGPT's train.py): SiT + EMA + AdamW

def build_model(a):
    """SiT (MeanFlowSiT for --objective meanflow) from a run's configuration as a dict."""
    sit = SiT
    if a.get('objective') == 'meanflow':
        from meanflow import MeanFlowSiT as sit
    size = SiT_models[a['model']].keywords
    return sit(**dict(size, input_size=a['input_size'], in_channels=a['in_channels'],
                      num_classes=a['num_classes'], encoder_depth=a['encoder_depth'],
                      target_dim=a.get('target_dim'), projector=a.get('projector', 'mlp'),
                      pred=a['pred'], proj_kernel=a.get('proj_kernel', 3)))

def new_model(args, ckpt, device):
    """SiT, its EMA and AdamW, from the seed or a checkpoint -> (model, ema, opt, step)."""
    torch.manual_seed(args.seed)                            # the same weights on every rank
    model = build_model(vars(args)).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.betas), weight_decay=0, eps=1e-8,
                            fused=device.type == 'cuda')
    if ckpt is None:
        return model, ema, opt, 0
    model.load_state_dict(ckpt['model'])
    ema.load_state_dict(ckpt['ema'])
    opt.load_state_dict(ckpt['opt'])
    return model, ema, opt, ckpt['step']

@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model (DiT's update_ema)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)

def step_seed(seed, step):
    """The run seed hashed to 32 bits (torch's CPU generator keeps 32), plus the step."""
    return (int(np.random.SeedSequence(seed).generate_state(1)[0]) + step) % 2 ** 32

def global_batches(num_samples, global_batch, seed, epoch):
    """The epoch's global batches: a seeded permutation, cut. Rank r of W trains on slice r."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples).tolist()
    starts = range(0, num_samples - global_batch + 1, global_batch)
    return [perm[i:i + global_batch] for i in starts]

LABEL_DROP = 0.1        # labels replaced by the null class in training, for CFG (DiT, SiT, REPA)

def training_inputs(images, labels, step, args, *, rank, world, generator, sd_vae, encoder,
                    mixed_precision, moments=None, times=None):
    """This rank's x, y, noise, t (B,), target. Drawn for the global batch from a generator seeded
    by the step, then sliced: any world size trains the same, a resume is exact. moments: stored
    SD-VAE mean and logvar; times: MeanFlow's hook, t -> (t, r) (B, 2)."""
    GB, C, S, dev = args.global_batch_size, args.in_channels, args.input_size, images.device
    mine = slice(rank * (GB // world), (rank + 1) * (GB // world))
    generator.manual_seed(step_seed(args.seed, step))
    u, drop, flip = torch.rand(3, GB, device=dev, generator=generator)
    n = torch.randn(GB, device=dev, generator=generator)
    noise = torch.randn((GB, C, S, S), device=dev, generator=generator)
    vae_noise = None                                        # the VAE's posterior's own
    if sd_vae is not None:
        vae_noise = torch.randn((GB, C, S, S), device=dev, generator=generator)
    t = sample_time(u, n, args.time_dist)                                       # (GB,)
    if times is not None:
        t = times(t, drop < LABEL_DROP, generator=generator)
    if args.hflip:                                          # drawn either way: the same stream
        images = torch.where((flip[mine] < 0.5).view(-1, 1, 1, 1), images.flip(-1), images)
    y = torch.where(drop[mine] < LABEL_DROP, args.num_classes, labels)
    x = images.float() / 127.5 - 1
    if moments is not None:                                 # latent: stored by prepare.py
        x = sd_vae.sample(*moments.chunk(2, dim=1), vae_noise[mine])            # (B, 4, S, S)
    elif sd_vae is not None:                                # latent: encoded here
        x = sd_vae.encode(x, vae_noise[mine])                                   # (B, 4, S, S)
    target = None
    if encoder is not None:
        with torch.no_grad(), mixed_precision:              # the same image as SiT's
            target = encoder(images.float()).float()                            # (B, T, D_enc)
        if args.spatial_norm:
            target = spatial_norm(target, args.spnorm_gamma)                    # iREPA
    return x, y, noise[mine], t[mine], target

def train(args, ckpt=None):
    """Trains `args` (get_args), from scratch or from a checkpoint; returns the run folder."""
    runs.check_settings(args)
    size = SiT_models[args.model].keywords
    patch = runs.check_model(args, size, ENCODERS)
    rank, world, device = setup_distributed()
    stop = runs.Preemption(world)                   # SIGTERM etc.: save the step, exit
    runs.check_batch_split(args, world)
    master = rank == 0
    dataset = data.open_dataset(args, ckpt)
    args.input_size = args.image_size // 8 if args.vae else args.image_size    # the SD-VAE: /8,
    args.in_channels = 4 if args.vae else 3                                     # 4 channels
    sd_vae, encoder = runs.frozen_networks(args, dataset, args.input_size // patch, device, world,
                                           load_encoder, ENCODERS)
    runs.derive_args(args, dataset, encoder, world, precision(device), size)
    model, ema, opt, step = new_model(args, ckpt, device)
    run_args = ckpt['args'] if ckpt else None
    if ckpt:                                        # restored: let go of the memory-mapped weights
        ckpt.clear()                                # (main holds the dict too)
    run_dir = args.resume or runs.new_run_dir(args, master, world)
    log = runs.Logger(run_dir, master)
    runs.log_start(log, args, run_args, model, dataset, step, run_dir, RECIPES[args.setting]['pred'])
    raw_model = model                               # saved without DDP/compile prefixes
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        # Gradients live in the all-reduce buckets (no copy); 100 MB buckets: 24 for SiT-XL/2's 2.6 GB
        # (25 MB: 59), each a graph piece under --compile.
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None,
            gradient_as_bucket_view=True, bucket_cap_mb=100)
    loss_fn, times = partial(flow_matching_loss, pred=args.pred), None
    if args.objective == 'meanflow':                # the second objective's hook
        import meanflow
        loss_fn, times = meanflow.objective(args, raw_model)

    # -- the loop: inputs -> loss -> gradient -> clip -> AdamW -> EMA; a log line every log_every
    #    steps and before each checkpoint (every ckpt_every). The step fixes the data's position.
    mixed_precision, generator = autocast(device), torch.Generator(device=device)
    steps_per_epoch = len(dataset) // args.global_batch_size
    warmup_steps = args.warmup_epochs * steps_per_epoch
    local_batch = args.global_batch_size // world
    micro = local_batch // args.grad_accum
    sums = torch.zeros(4, device=device)            # loss, denoise, align, grad norm
    t0, last_step = time.time(), step
    model.train()
    while step < args.max_steps and not stop.agreed:
        epoch, start = divmod(step, steps_per_epoch)
        epoch_batches = global_batches(len(dataset), args.global_batch_size, args.seed, epoch)
        batches = [b[rank * local_batch:(rank + 1) * local_batch] for b in epoch_batches[start:]]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                             num_workers=args.num_workers,
                                             pin_memory=device.type == 'cuda',
                                             worker_init_fn=runs.worker_init)
        for images, labels, *moments in loader:             # moments: a prepared latent folder's
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            moments = moments[0].to(device, non_blocking=True) if moments else None
            x, y, noise, t, target = training_inputs(
                images, labels, step, args, rank=rank, world=world, generator=generator,
                sd_vae=sd_vae, encoder=encoder, mixed_precision=mixed_precision, moments=moments,
                times=times)
            if warmup_steps:                                # JiT: linear warm-up, then constant
                for group in opt.param_groups:
                    group['lr'] = args.lr * min(1.0, step / warmup_steps)
            for k in range(args.grad_accum):                # micro-batches of this rank's slice
                mb = slice(k * micro, (k + 1) * micro)
                if world > 1:                               # all-reduce on the last one only
                    model.require_backward_grad_sync = k == args.grad_accum - 1
                with mixed_precision:
                    denoise, align = loss_fn(model, x[mb], y[mb], noise[mb], t[mb],
                                             None if target is None else target[mb])
                    loss = denoise + args.proj_coeff * align                    # REPA eq. 8
                (loss / args.grad_accum).backward()
                losses = torch.stack([loss.detach(), denoise.detach(), align.detach()])
                sums[:3] += losses / args.grad_accum
            max_norm = args.clip_grad or math.inf
            sums[3] += torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, raw_model, args.ema_decay)
            step += 1
            last = step == args.max_steps or bool(stop.stop())      # the same on every rank
            save = step % args.ckpt_every == 0 or last
            if step % args.log_every == 0 or save:      # each checkpoint's loss is logged, checked
                if world > 1:
                    dist.all_reduce(sums)                   # a sum (gloo has no AVG)
                loss, denoise, align, grad_norm = (sums / ((step - last_step) * world)).tolist()
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    runs.stop_diverged(loss, grad_norm, step, run_dir)
                dt = (time.time() - t0) / (step - last_step)
                name = 'mf' if args.objective == 'meanflow' else 'fm'
                log(f"step {step}/{args.max_steps} | loss {loss:.4f} "
                    f"({name} {denoise:.4f}, align {align:.4f}) | grad {grad_norm:.3f} | "
                    f"{dt * 1000:.0f} ms | {args.global_batch_size / dt:.0f} img/s")
                sums.zero_()
                t0, last_step = time.time(), step
            if save:
                runs.save_run(log, run_dir, step, raw_model, ema, opt, args, master, last)
            if last:
                break
    runs.wait_for_save(last=True, group=stop.group)
    stop.close()                                    # the signals' handlers end after the last save
    if stop.agreed:
        runs.log_stop(log, stop.agreed, step, run_dir, rank)
    elif master and args.setting == 'demo':
        print(f"demo: now sample a grid with  python sample.py --ckpt {run_dir}", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return run_dir

# -----------------------------------------------------------------------------
# 10. The command line: the setting's recipe, then the flags, then --key=value for any recipe key
#     (nanoGPT's configurator); --resume continues a run with its own settings.

def get_parser():
    """The flags; defaults None come from the recipe, and any recipe key is --key=value."""
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--setting', default='latent', choices=list(RECIPES),
                   help="latent: SD-VAE latents, REPA's recipe (the paper's); pixel: JiT's recipe; "
                        "demo: CPU, 3 min")
    p.add_argument('--model', choices=list(SiT_models))
    p.add_argument('--image-size', type=int)
    p.add_argument('--encoder', help=f"{', '.join(ENCODERS)}, a --hub-dir entry, or none")
    p.add_argument('--hub-dir', help="a local torch.hub folder (with hubconf.py)")
    p.add_argument('--objective', default='fm', choices=['fm', 'meanflow'],
                   help="fm: flow matching (the paper's); meanflow: one- and few-step (Table 3b)")
    p.add_argument('--irepa', action=argparse.BooleanOptionalAction, default=False,
                   help="iREPA: conv projector + spatial norm (--no-irepa: REPA)")
    p.add_argument('--proj-coeff', type=float,
                   help="lambda of the alignment loss (latent: REPA 0.5, iREPA 1.0)")
    p.add_argument('--encoder-depth', type=int, help="align after this block")
    p.add_argument('--data-path', help="root/<class>/<image>, or prepared; none: shapes")
    p.add_argument('--global-batch-size', type=int)
    p.add_argument('--grad-accum', type=int, default=1, help="micro-batches a step and GPU")
    p.add_argument('--lr', type=float, help="pixel: 5e-5 x global batch / 256")
    p.add_argument('--max-steps', type=int)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--results-dir', default='results')
    p.add_argument('--resume', help="a run folder: go on from its latest checkpoint")
    p.add_argument('--ckpt-every', type=int)
    p.add_argument('--num-workers', type=int)
    p.add_argument('--compile', action='store_true', help="torch.compile the model")
    return p

def get_args(argv=None):
    """The configuration: the setting's recipe, MeanFlow's on top with --objective meanflow, then
    the command line's flags, then its --key=value (runs.configure)."""
    p = get_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    known, rest = p.parse_known_args(argv)
    if bad := [a for a in rest if not (a.startswith('--') and '=' in a)]:
        runs.fail(f"unrecognised argument {bad[0]}: use a flag (--help) or --key=value")
    recipe = copy.deepcopy({**COMMON, **RECIPES[known.setting]})               # never the tables'
    if known.objective == 'meanflow':
        import meanflow
        recipe.update(copy.deepcopy(meanflow.RECIPE))
    p.set_defaults(**recipe)
    args = p.parse_args([a for a in argv if a not in rest])
    runs.configure(args, rest, p, [recipe, COMMON, *RECIPES.values()])
    if isinstance(args.proj_coeff, dict):                   # the latent recipe's REPA vs iREPA
        args.proj_coeff = args.proj_coeff['irepa' if args.irepa else 'repa']
    if args.lr is None:                                     # JiT: linear in the batch
        if getattr(args, 'base_lr', None) is None:
            runs.fail(f"the {args.setting} setting has no base_lr to scale with the batch: give --lr")
        args.lr = args.base_lr * args.global_batch_size / 256
    if args.projector is None:
        args.projector = 'conv' if args.irepa else 'mlp'
    if args.spatial_norm is None:
        args.spatial_norm = args.irepa
    return args

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, ckpt = get_args(argv), None
    if args.resume:
        args, ckpt = runs.resume(args, argv, get_parser())
    try:
        return train(args, ckpt)
    finally:
        runs.end_run()                              # however it ended: the signals as they were

if __name__ == '__main__':
    main()
