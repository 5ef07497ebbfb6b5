"""
irepa.py -- REPA and iREPA in one file: SiT, flow matching, representation alignment, and DDP
training.

iREPA ("What matters for Representation Alignment: Global Information or Spatial Structure?",
arXiv 2512.10794) improves REPA (arXiv 2410.06940) with two changes, both switched on by `--irepa`:
  1. a 3x3 conv projector on the token grid instead of REPA's per-token MLP,
  2. spatial normalisation of the encoder's patch tokens:
     (target - gamma * mean_T target) / std_T target.

Time convention, used everywhere in this repo (sample.py too): t = 0 is data, t = 1 is noise,
    x_t = (1 - t) * x + t * eps,   target velocity v = eps - x.

Read it top to bottom: the method in the paper's order (sections 1-6: SiT, projectors, encoders,
spatial norm, losses) and MeanFlow as a second objective (7), then the data, the settings and the
training loop (8-10). The appendix (A-E) holds what a real run needs and a first reading can skip:
processes and precision, data sources, one-line errors, run folders and checkpoints, reading a
trained SiT back.

Three settings, one code path (`--setting`, recipes in section 8; explicit flags win):
    latent  the paper's main setting: SiT-XL/2 on 32x32x4 SD-VAE latents of 256 px images,
            REPA's recipe (default)
    pixel   SiT-B/16 on 256 px pixels with JiT's recipe (x-prediction, logit-normal t, warm-up;
            iREPA Table 10)
    demo    tiny SiT on 16 px procedural shapes, HOG target, iREPA: CPU, offline, ~3 minutes

Run it:
    # CPU, then a grid of samples:
    python irepa.py --setting demo && python sample.py --ckpt results/demo-SiT-T-4-hog-irepa
    # one GPU:
    python irepa.py --encoder dinov2_vitb14 --irepa --data-path /path/to/imagenet/train
    # 8 GPUs:
    torchrun --nproc_per_node=8 irepa.py --encoder dinov2_vitb14 --irepa --data-path /path/to/imagenet/train
    torchrun --nproc_per_node=8 irepa.py --setting pixel --encoder dinov2_vitb14 --irepa --data-path ...
    ... --objective meanflow                    # MeanFlow instead of flow matching (section 7)
    ... --spnorm_gamma=0.8 --ema_decay=0.9999   # any recipe key without a flag: --key=value
    multi-node: torchrun --nnodes=N --node_rank=R --master_addr=... --nproc_per_node=8 irepa.py ...
bf16 autocast on CUDA and on CPUs with bf16 instructions; IREPA_PRECISION=fp32 in the environment
forces fp32.
"""
import argparse
import contextlib
import copy
import glob
import json
import math
import os
import platform
import socket
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from functools import lru_cache, partial
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

# =============================================================================
# The method, in the paper's order: SiT, the projectors, the encoders, the spatial norm, the losses
# =============================================================================

# -----------------------------------------------------------------------------
# 1. SiT's parts: the diffusion transformer (DiT, arXiv 2212.09748; SiT, arXiv 2401.08740;
#    willisma/SiT models.py)
#    Parameter names follow the official SiT/REPA code so their checkpoints load by name.

def modulate(x, shift, scale):
    # adaLN: x (B, T, D), shift/scale (B, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

def sincos_1d(dim, pos):
    """MAE-style 1-D embedding: pos (M,) -> (M, dim) = [sin(pos * w), cos(pos * w)],
    w = 1/10000^(i/(dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

def sincos_2d(dim, grid_size):
    """(grid_size**2, dim): first dim/2 channels from the column index,
    second dim/2 from the row index."""
    # 'ij' indexing: rows and columns in raster order.
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing='ij')
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)

class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) tokens in row-major raster order, T = (H/p) * (W/p)."""
    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)

class TimestepEmbedder(nn.Module):
    """t in [0, 1] (no x1000 scaling) -> cos and sin of 128 frequencies (256 dims) -> MLP
    -> (B, D)."""
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
    """Class label -> (B, D). Row `num_classes` is the null class of classifier-free guidance.
    Labels are dropped to the null class by the training loop (training_inputs), not in here,
    so that model(x, t, y) is a deterministic function."""
    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)

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
        # softmax(q k^T / sqrt(hs)) v
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
    """Transformer block with adaLN-Zero: the condition c gives the shift, scale and gate
    of both branches."""
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
# 2. Projectors: REPA's MLP and iREPA's conv (REPA section 3.2; iREPA section 4, official
#    ldm/models/sit.py)

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
    """Scalable interpolant transformer. model(x, t, y) -> (out, h_proj):
    out has x's shape (the velocity for pred='v', the clean image for pred='x');
    h_proj (B, T, target_dim) is the projected hidden state after block `encoder_depth`
    (None without target_dim)."""
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
        """The projector, built after the rest: a seed gives the same SiT weights with any
        projector. A list of one, as in the official code (which can align several encoders): its
        weights are named projectors.0.*. The MLP gets DiT's init; the conv keeps torch's
        default."""
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
        for layer in zero_init:
            # adaLN-Zero: the blocks start as the identity.
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
                # The residual stream, before any norm.
                h_proj = self.project(h)
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
# 4. Frozen encoders: patch tokens (B, T, D) on SiT's token grid (REPA section 4.1; official
#    ldm/vision_encoder.py)
#    Input: images (B, 3, H, W) as floats in 0..255 -- the images that SiT (or, in the latent
#    setting, the SD-VAE) gets, before the [-1, 1] scaling.

# The torch.hub encoders of the paper: DINOv2 (patch 14), DINOv3 (patch 16; Tables 2, 3b and 4 use
# DINOv3-B) and DINOv1 (patch 16). Each family's repository and its preprocessing follow the
# official ldm/vision_encoder.py. Besides them, 'hog': a weight-free Histogram of Oriented
# Gradients, one cell per token (appendix B), since classical descriptors of pure spatial structure
# also help REPA (iREPA section 3).
HUB_FAMILIES = {'dinov2': 'facebookresearch/dinov2', 'dinov3': 'facebookresearch/dinov3',
                'dino': 'facebookresearch/dino'}
DINOV2 = [f'dinov2_vit{s}14{r}' for s in 'sblg' for r in ('', '_reg')]
DINOV3 = ['dinov3_vits16', 'dinov3_vitb16', 'dinov3_vitl16']
DINOV1 = ['dino_vits16', 'dino_vitb16']
ENCODERS = ('hog',) + tuple(DINOV2 + DINOV3 + DINOV1)

class HubEncoder(nn.Module):
    """A torch.hub ViT with the official preprocessing for its family (ldm/vision_encoder.py): /255,
    ImageNet mean/std, and a resize to patch * grid so that its patch grid equals SiT's (at 256 px:
    16x16 for patch 14 and 16):
        DINOv2: bicubic resize to 14 * grid; absolute position embedding resampled once to the grid;
        DINOv1: bicubic resize to 16 * grid; the same resampling; patch tokens of
                get_intermediate_layers (normed);
        DINOv3: bilinear antialiased resize to 16 * grid (torchvision's Resize); RoPE needs no
                resampling.
    Other --hub-dir entries with DINOv2's interface count as DINOv2 (e.g. experiments/hubconf.py's
    ResNet-20)."""
    def __init__(self, name, grid_size, hub_repo=None):
        super().__init__()
        self.name, self.grid_size, self.family = name, grid_size, hub_family(name)
        self.model = hub_load(name, hub_repo)
        self.resolution = hub_patch_size(self.model, name) * grid_size
        self.embed_dim = self.model.embed_dim
        pe = getattr(self.model, 'pos_embed', None)
        # pe (1, 1 + N, D): the CLS position, then the patch positions.
        if pe is not None and pe.shape[1] - 1 != grid_size ** 2:
            n = math.isqrt(pe.shape[1] - 1)
            grid = pe[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(grid_size, grid_size), mode='bicubic',
                                 antialias=True)
            patch_pos = grid_to_tokens(grid).to(pe.dtype)
            self.model.pos_embed = nn.Parameter(torch.cat([pe[:, :1], patch_pos], dim=1))
        # ImageNet mean and std, scaled to 0..255.
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

    # img: (B, 3, H, W) in 0..255.
    def forward(self, img):
        x, size = (img.float() - self.mean) / self.std, (self.resolution, self.resolution)
        # Resizing after the normalisation gives the same result (the resize weights sum to 1).
        if x.shape[-2:] != size:
            mode = 'bilinear' if self.family == 'dinov3' else 'bicubic'
            x = F.interpolate(x, size=size, mode=mode, antialias=self.family == 'dinov3',
                              align_corners=False)
        if self.family == 'dino':
            return self.model.get_intermediate_layers(x)[0][:, 1:]              # (B, T, D), no CLS
        # Patch tokens only: no CLS, no registers.
        return self.model.forward_features(x)['x_norm_patchtokens']             # (B, T, D)

def load_encoder(name, grid_size, hub_repo=None, device='cpu'):
    """A frozen encoder: eval mode, no gradients, .embed_dim; call it under torch.no_grad()."""
    if name == 'hog':
        enc = HOG(grid_size)
    # A hub encoder of the paper, or an entry of --hub-dir's hubconf.py.
    elif name in ENCODERS or hub_repo is not None:
        enc = HubEncoder(name, grid_size, hub_repo)
    else:
        raise ValueError(f"unknown encoder '{name}'; choose one of: {', '.join(ENCODERS)}, "
                         f"or an entry of the hubconf.py in --hub-dir")
    return enc.to(device).eval().requires_grad_(False)

# -----------------------------------------------------------------------------
# 5. iREPA's spatial normalisation of the encoder targets (iREPA section 4; official ldm/utils.py
#    spatial_zscore, jit/spnorm.py)

def spatial_norm(target, gamma=0.6, eps=1e-6):
    """target (B, T, D) -> (target - gamma * mean_T) / (std_T + eps), statistics over the token
    axis. (gamma is the official code's zscore_alpha: --zscore-alpha in ldm/train.py and
    jit/main_jit.py.) Subtracting the mean token removes the global component shared by all patches,
    so what is left to align with is the contrast between patches: the spatial structure."""
    mean = target.mean(dim=1, keepdim=True)                                     # (B, 1, D)
    # The unbiased std over tokens (shift invariant).
    std = target.std(dim=1, keepdim=True)
    return (target - gamma * mean) / (std + eps)

# -----------------------------------------------------------------------------
# 6. Flow matching and alignment losses (SiT section 2; REPA eq. 8; official jit/denoiser.py for
#    x-prediction)

def interpolant(x, noise, t):
    """Linear path: t = 0 data, t = 1 noise. Returns x_t and the target velocity d x_t / dt."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x + t * noise, noise - x

def to_velocity(out, x_t, t, pred):
    """The network predicts v directly, or (JiT, pixel space at large patches) the clean image
    x_hat, whose implied velocity is (x_t - x_hat) / t, with t clamped at 0.05 to stay finite near
    the data."""
    if pred == 'v':
        return out
    return (x_t - out) / t.clamp(min=0.05).view(-1, 1, 1, 1)

def alignment_loss(h_proj, target):
    """Mean over tokens and batch of -cos(h_proj, target), in float32 (fp16 gave NaNs,
    sihyun-yu/REPA issue #46). h_proj, target (B, T, D_enc)."""
    h_proj = F.normalize(h_proj.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return -(h_proj * target).sum(dim=-1).mean()

def flow_matching_loss(model, x, y, noise, t, target=None, pred='v'):
    """The two losses of one batch. x (B, C, H, W) in [-1, 1], noise like x, t (B,) in [0, 1],
    target (B, T, D_enc) or None. Returns (denoising loss, alignment loss).
    With x-prediction both velocities go through the same clamped t (official jit/denoiser.py), so
    the loss is ||x_hat - x||^2 / max(t, 0.05)^2 and its optimum is x_hat = x at every t."""
    x_t, v = interpolant(x, noise, t)
    out, h_proj = model(x_t, t, y)
    v_hat = to_velocity(out.float(), x_t, t, pred)
    if pred == 'x':
        # This equals noise - x for t >= 0.05.
        v = to_velocity(x, x_t, t, pred)
    # The mean per sample, then over the batch.
    denoise = ((v_hat - v) ** 2).mean(dim=(1, 2, 3)).mean()
    # Plain SiT (no target): the alignment loss is 0.
    align = alignment_loss(h_proj, target) if target is not None else torch.zeros_like(denoise)
    return denoise, align

def sample_time(u, n, time_dist=None):
    """Training times from uniform draws u (B,) and normal draws n (B,): t ~ U[0, 1) (SiT, REPA)
    when the recipe's time_dist is None, else the logit-normal t = sigmoid(mean + std * n) with
    (mean, std) = time_dist (JiT's; mean 0.8 in this convention puts most t near the noise)."""
    if time_dist is None:
        return u
    mean, std = time_dist
    return torch.sigmoid(mean + std * n)

# -----------------------------------------------------------------------------
# 7. A second objective: MeanFlow (Geng et al., arXiv 2505.13447; official Gsunshine/meanflow
#    meanflow.py and Gsunshine/py-meanflow), the "MeanFlow w/ REPA" of iREPA Table 3b. The network
#    u(x_t, t, y, interval = t - r) learns the average velocity over [r, t], so one step
#    x_0 = x_1 - u(x_1, 1, y, 1) draws a sample. The alignment loss is unchanged.
#    `--objective meanflow` switches the model, the times and the loss.

# MeanFlow's recipe, applied on top of any setting: the official ImageNet SiT-B/2 recipe
# (Gsunshine/meanflow configs/default.py): t and r ~ sigmoid(N(-0.4, 1)), a quarter of the batch
# with r != t, guidance trained in (omega 1, kappa 0.5: an effective scale 2), adaptive loss weight
# p 1, eps 0.01; AdamW betas (0.9, 0.95), no clipping; 1-step sampling. The network outputs u (no
# x-prediction).
MEANFLOW = dict(pred='v', time_dist=(-0.4, 1.0), betas=(0.9, 0.95), clip_grad=None,
                meanflow=dict(ratio=0.25, omega=1.0, kappa=0.5, p=1.0, eps=0.01),
                sampler=dict(mode='meanflow', num_steps=1))

class MeanFlowSiT(SiT):
    """SiT with a second time embedding, for the interval t - r, summed into the condition and
    initialised like t's (MeanFlow's DiT). model(x, t, y, interval) -> (u, h_proj);
    interval 0 (or None): the velocity."""
    def __init__(self, hidden_size=1152, target_dim=None, projector='mlp', proj_kernel=3, **kwargs):
        super().__init__(hidden_size=hidden_size, **kwargs)
        self.interval_embedder = xavier_linears(TimestepEmbedder(hidden_size))
        for layer in (self.interval_embedder.mlp[0], self.interval_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        self.add_projector(hidden_size, target_dim, projector, proj_kernel)

    def embed(self, x, t, y, interval=None):
        h, c = super().embed(x, t, y)
        interval = torch.zeros_like(t) if interval is None else interval
        return h, c + self.interval_embedder(interval)

    def forward(self, x, t, y, interval=None):
        return self.trunk(*self.embed(x, t, y, interval))

def meanflow_times(t, dropped, ratio, time_dist, generator):
    """MeanFlow's two times for the global batch, (B, 2): a second draw r from the same
    distribution, t, r = max, min; then r = t except for exactly B - int((1 - ratio) B) rows, drawn among
    those whose label was kept. (The official meanflow.py sets r = t on the first 1 - ratio of the
    rows and drops labels from the first rows: a dropped label never has r != t.)"""
    B, dev = len(t), t.device
    pick, u_r = torch.rand(2, B, device=dev, generator=generator)
    r = sample_time(u_r, torch.randn(B, device=dev, generator=generator), time_dist)
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    order = pick.masked_fill(dropped, math.inf).argsort()                      # kept labels first
    apart = torch.zeros(B, dtype=torch.bool, device=dev)
    apart[order[:B - int((1 - ratio) * B)]] = True
    apart &= ~dropped
    return torch.stack([t, torch.where(apart, r, t)], dim=1)                   # (B, 2): t, r

def meanflow_du_dt(model, x_t, t, r, y, v_g):
    """du/dt along the flow: the Jacobian-vector product of (x_t, t, r) -> u(x_t, t, y, t - r) with
    the tangents (v_g, 1, 0). Forward-mode AD on the plain module, never the DDP/compiled one (whose
    gradient all-reduce must not be bypassed; this is a target, so no gradient is needed). The fused
    attention kernels have no forward-mode AD, so attention runs the math kernel here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, du_dt = torch.func.jvp(lambda x, t, r: model(x, t, y, t - r)[0], (x_t, t, r),
                                  (v_g, torch.ones_like(t), torch.zeros_like(r)))
    return du_dt.float()

def meanflow_loss(model, x, y, noise, tr, target=None, *, raw_model, omega, kappa, p, eps):
    """MeanFlow's objective for one batch; tr (B, 2) holds t and r <= t (meanflow_times).
    Guidance is trained in:
        v_g = omega v + kappa u(x_t, t | y) + (1 - omega - kappa) u(x_t, t | null),
    v itself where the label was dropped. The target u_tgt = v_g - (t - r) du/dt is held fixed
    (stop-gradient); the loss per sample is the SUM of squares l, weighted by
    1 / stopgrad(l + eps)^p. u and the aligned hidden state come from one ordinary forward of
    `model` (the DDP one), so the alignment loss sees the pass that carries the gradient.
    Returns (loss, align) as flow_matching_loss."""
    t, r = tr.unbind(1)                                                         # (B,), (B,)
    x_t, v = interpolant(x, noise, t)
    with torch.no_grad():
        v_g = v
        # Both guidance passes in one batch.
        if omega != 1 or kappa != 0:
            null, zero = torch.full_like(y, raw_model.num_classes), torch.zeros_like(t)
            both = raw_model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]),
                             torch.cat([zero, zero]))
            u_c, u_u = both[0].float().chunk(2)
            dropped = (y == raw_model.num_classes).view(-1, 1, 1, 1)
            v_g = torch.where(dropped, v, omega * v + kappa * u_c + (1 - omega - kappa) * u_u)
        u_tgt = v_g - (t - r).view(-1, 1, 1, 1) * meanflow_du_dt(raw_model, x_t, t, r, y, v_g)
    u, h_proj = model(x_t, t, y, t - r)
    # A sum of squares per sample, not a mean.
    err = ((u.float() - u_tgt) ** 2).sum(dim=(1, 2, 3))                        # (B,)
    loss = (err / (err.detach() + eps) ** p).mean()                             # adaptive weight
    # With p = 1 the weighted loss is ~1 whatever the error: the value returned (and logged) is the
    # mean error, the gradient the weighted loss's.
    loss = loss - loss.detach() + err.detach().mean()
    align = alignment_loss(h_proj, target) if target is not None else torch.zeros_like(loss)
    return loss, align

# =============================================================================
# Training: the data, the settings, the loop
# =============================================================================

# -----------------------------------------------------------------------------
# 8. Data: images as uint8 (3, S, S) with labels, from class folders (ImageFolder, with ADM's center
#    crop) or drawn on the fly (Shapes, the demo's), both in appendix B. In the latent setting the
#    frozen SD-VAE (SDVAE, appendix B) turns them into SiT's input.

def global_batches(num_samples, global_batch, seed, epoch):
    """The epoch's global batches: a seeded permutation cut into batches of `global_batch` (the
    last, incomplete one dropped). Rank r of W trains on slice r of each, so any world size sees the
    same batches."""
    # One permutation per (seed, epoch).
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples).tolist()
    starts = range(0, num_samples - global_batch + 1, global_batch)
    return [perm[i:i + global_batch] for i in starts]

# -----------------------------------------------------------------------------
# 9. Settings: one recipe per setting (nanoGPT's config files, as dicts). `--setting` picks one; the
#    command line wins: its flags, and `--key=value` for any other key. Every resolved value is
#    printed to log.txt and stored in the checkpoint.

RECIPES = {
    # The paper's main setting: SiT on SD-VAE latents with REPA's recipe (iREPA Appendix G; official
    # ldm/train.py, ldm/configs/irepa.yaml and repa.yaml; REPA section 4.1). 256 px images ->
    # 32x32x4 latents -> SiT-XL/2's 16x16 grid. proj_coeff: REPA's 0.5, iREPA's 1.0.
    # Sampler: REPA's FID one.
    'latent': dict(vae='sd-vae-ft-mse', model='SiT-XL/2', image_size=256, encoder='dinov2_vitb14',
                   pred='v', time_dist=None, lr=1e-4, betas=(0.9, 0.999), warmup_epochs=0,
                   clip_grad=1.0, hflip=False, ema_decay=0.9999, spnorm_gamma=0.6,
                   proj_coeff=dict(repa=0.5, irepa=1.0), global_batch_size=256, max_steps=400_000,
                   ckpt_every=50_000, log_every=100, num_workers=4,
                   sampler=dict(mode='sde', num_steps=250, cfg_scale=1.0)),
    # Pixel space: SiT trained with the recipe of JiT (Li & He, "Back to Basics: Let Denoising
    # Generative Models Denoise", arXiv 2511.13720), as in iREPA Table 10 (official jit/main_jit.py,
    # engine_jit.py, jit/configs/irepa.yaml). The network is still SiT, not JiT's. x-prediction,
    # logit-normal t (JiT's P_mean -0.8 on its reversed time is +0.8 here), lr 5e-5 per 256 images
    # with a 5-epoch warm-up, betas (0.9, 0.95), no clipping, flips; JiT-B/16's size, aligned after
    # block 4 (SiT-B's default, as in the official README's JiT-B/16 commands).
    # Sampler: JiT's Heun 50 steps, no CFG.
    'pixel': dict(vae=None, model='SiT-B/16', image_size=256, encoder='dinov2_vitb14', pred='x',
                  time_dist=(0.8, 0.8), lr=None, base_lr=5e-5, betas=(0.9, 0.95), warmup_epochs=5,
                  clip_grad=None, hflip=True, ema_decay=0.9999, spnorm_gamma=0.8, proj_coeff=0.5,
                  global_batch_size=256, max_steps=200_000, ckpt_every=50_000, log_every=100,
                  num_workers=4, sampler=dict(mode='ode', heun=True, num_steps=50, cfg_scale=1.0)),
    # The CPU demo: tiny SiT on 16 px procedural shapes with a HOG target and iREPA, ~3 minutes on
    # 2 cores (patch 4: a 4x4 token grid, 3x cheaper a step than patch 2 in fp32, for CPUs
    # without bf16).
    'demo': dict(vae=None, model='SiT-T/4', image_size=16, encoder='hog', irepa=True, pred='v',
                 time_dist=None, lr=2e-3, betas=(0.9, 0.999), warmup_epochs=0, clip_grad=1.0,
                 hflip=False, ema_decay=0.995, spnorm_gamma=0.6, proj_coeff=0.5,
                 global_batch_size=32, max_steps=1200, ckpt_every=1200, log_every=50, num_workers=0,
                 sampler=dict(mode='ode', heun=True, num_steps=25, cfg_scale=4.0)),
}
# Keys every setting shares. iREPA's two changes follow --irepa unless set on their own (projector
# 'mlp' or 'conv', spatial_norm True or False: iREPA Table 2's ablation); proj_kernel is the
# conv's size.
COMMON = dict(projector=None, spatial_norm=None, proj_kernel=3)

def get_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument('--setting', default='latent', choices=list(RECIPES),
                   help="latent: SD-VAE latents, REPA's recipe (the paper's); pixel: JiT's recipe; "
                        "demo: CPU, 3 min")
    g = p.add_argument_group("what to train (defaults: the setting's recipe; "
                             "any recipe key: --key=value)")
    g.add_argument('--model', choices=list(SiT_models))
    g.add_argument('--image-size', type=int)
    g.add_argument('--encoder',
                   help=f"alignment target: {', '.join(ENCODERS)} (hog needs no download), "
                        f"an entry of --hub-dir's hubconf.py, or 'none' for plain SiT")
    g.add_argument('--hub-dir', default=None,
                   help="local torch.hub folder (with hubconf.py), e.g. offline")
    g.add_argument('--objective', default='fm', choices=['fm', 'meanflow'],
                   help="fm: flow matching (the paper's); meanflow: MeanFlow, one- and few-step "
                        "(iREPA Table 3b)")
    g.add_argument('--irepa', action=argparse.BooleanOptionalAction, default=False,
                   help="iREPA: conv projector + spatial norm "
                        "(--no-irepa: REPA's MLP and raw targets)")
    g.add_argument('--proj-coeff', type=float,
                   help="lambda of the alignment loss (latent: REPA 0.5, iREPA 1.0)")
    g.add_argument('--encoder-depth', type=int, default=None,
                   help="align after this block (default: per size)")
    g.add_argument('--data-path', default=None,
                   help="root/<class>/<image>; none: the procedural Shapes set")
    g = p.add_argument_group('optimisation')
    g.add_argument('--global-batch-size', type=int)
    g.add_argument('--grad-accum', type=int, default=1,
                   help="micro-batches per optimizer step and GPU")
    g.add_argument('--lr', type=float, help="learning rate (pixel: 5e-5 x global batch / 256)")
    g.add_argument('--max-steps', type=int)
    g.add_argument('--seed', type=int, default=0)
    g = p.add_argument_group('run')
    g.add_argument('--results-dir', default='results')
    g.add_argument('--resume', default=None,
                   help="a run folder: continue from its latest checkpoint")
    g.add_argument('--ckpt-every', type=int)
    g.add_argument('--log-every', type=int)
    g.add_argument('--num-workers', type=int)
    g.add_argument('--compile', action='store_true', help="torch.compile the model")
    return p

def get_args(argv=None):
    """The run's configuration, one namespace: the setting's recipe, MeanFlow's on top of it with
    --objective meanflow, then the command line (configure, appendix C)."""
    p = get_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    known, rest = p.parse_known_args(argv)
    if bad := [a for a in rest if not (a.startswith('--') and '=' in a)]:
        fail(f"unrecognised argument {bad[0]}: use a flag (--help) or --key=value")
    recipe = copy.deepcopy({**COMMON, **RECIPES[known.setting]})               # never the tables' dicts
    if known.objective == 'meanflow':
        recipe.update(copy.deepcopy(MEANFLOW))
    p.set_defaults(**recipe)
    # The flags win over the recipe.
    args = p.parse_args([a for a in argv if a not in rest])
    configure(args, rest, p)                                                    # then --key=value
    # The latent recipe gives REPA and iREPA different coefficients.
    if isinstance(args.proj_coeff, dict):
        args.proj_coeff = args.proj_coeff['irepa' if args.irepa else 'repa']
    # JiT: the learning rate scales linearly with the batch.
    if args.lr is None:
        if getattr(args, 'base_lr', None) is None:
            fail(f"the {args.setting} setting has no base_lr to scale with the batch: give --lr")
        args.lr = args.base_lr * args.global_batch_size / 256
    if args.projector is None:
        args.projector = 'conv' if args.irepa else 'mlp'
    if args.spatial_norm is None:
        args.spatial_norm = args.irepa
    return args

# -----------------------------------------------------------------------------
# 10. The training loop (REPA's train.py, DiT's train.py, nanoGPT's train.py): SiT + EMA + AdamW.
#     The checks, process set-up, run folders and checkpoints it calls are in the appendix below.

def new_model(args, ckpt, device):
    """SiT, its EMA and AdamW, from the seed or, on a resume, from the checkpoint.
    -> (model, ema, opt, step)"""
    # The same weights on every rank.
    torch.manual_seed(args.seed)
    model = build_model(vars(args)).to(device)
    # EMA starts as an exact copy.
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

LABEL_DROP = 0.1        # labels replaced by the null class in training, for CFG (DiT, SiT, REPA)

def training_inputs(images, labels, step, args, *, rank, world, generator, sd_vae, encoder,
                    mixed_precision, moments=None):
    """One step's inputs for this rank: x (B, C, S, S), y (B,), noise like x, t (B,)
    (MeanFlow: (B, 2), t and r), target (B, T, D_enc) or None. `moments` (B, 8, S, S): a prepared
    folder's stored SD-VAE mean and logvar, sampled instead of encoding. Every random number of a
    step is drawn for the whole global batch from a generator seeded by the step, and each rank
    takes its slice: any world size or --grad-accum trains the same, and a resume is exact.
    (Drawing the global batch is cheap next to SiT.)"""
    GB, C, S, dev = args.global_batch_size, args.in_channels, args.input_size, images.device
    mine = slice(rank * (GB // world), (rank + 1) * (GB // world))
    generator.manual_seed(step_seed(args.seed, step))
    u, drop, flip = torch.rand(3, GB, device=dev, generator=generator)
    n = torch.randn(GB, device=dev, generator=generator)
    noise = torch.randn((GB, C, S, S), device=dev, generator=generator)
    eps = None
    if sd_vae is not None:
        eps = torch.randn((GB, C, S, S), device=dev, generator=generator)
    t = sample_time(u, n, args.time_dist)                                       # (GB,)
    # The second objective's hook.
    if args.objective == 'meanflow':
        t = meanflow_times(t, drop < LABEL_DROP, args.meanflow['ratio'], args.time_dist, generator)
    # The flips are drawn either way, so the random stream stays the same.
    if args.hflip:
        images = torch.where((flip[mine] < 0.5).view(-1, 1, 1, 1), images.flip(-1), images)
    # The null class is num_classes.
    y = torch.where(drop[mine] < LABEL_DROP, args.num_classes, labels)
    # SiT (or the VAE) sees images in [-1, 1].
    x = images.float() / 127.5 - 1
    # The latent setting: a normalised posterior sample of the SD-VAE, from the moments stored
    # by prepare.py (as the official code trains) or by encoding the batch.
    if moments is not None:
        x = sd_vae.sample(*moments.chunk(2, dim=1), eps[mine])                  # (B, 4, S, S)
    elif sd_vae is not None:
        x = sd_vae.encode(x, eps[mine])                                         # (B, 4, S, S)
    target = None
    if encoder is not None:
        with torch.no_grad(), mixed_precision:
            # The encoder sees the same image as SiT.
            target = encoder(images.float()).float()                            # (B, T, D_enc)
        if args.spatial_norm:
            # iREPA's spatial norm, on the targets only.
            target = spatial_norm(target, args.spnorm_gamma)
    return x, y, noise[mine], t[mine], target

def main(argv=None):
    # -- the run's configuration (a resume takes the run's own), checked before anything heavy
    #    starts
    argv = sys.argv[1:] if argv is None else list(argv)
    args, ckpt = get_args(argv), None
    if args.resume:
        ckpt = load_latest_checkpoint(args.resume)
        args = resume_args(args, given_keys(argv), ckpt['args'])
    check_settings(args)
    patch = check_model(args)
    rank, world, device = setup_distributed()
    check_batch_split(args, world)
    master = rank == 0
    dataset = open_dataset(args, ckpt)
    # values derived at start join the configuration (the SD-VAE: 8x smaller, 4 channels)
    args.input_size = args.image_size // 8 if args.vae else args.image_size
    args.in_channels = 4 if args.vae else 3
    sd_vae, encoder = frozen_networks(args, dataset, args.input_size // patch, device, world)
    derive_args(args, dataset, encoder, world, device)
    model, ema, opt, step = new_model(args, ckpt, device)
    ckpt = ckpt and dict(args=ckpt['args'])            # restored: drop the memory-mapped weights
    run_dir = args.resume or new_run_dir(args, master, world)
    log = Logger(run_dir, master)
    log_start(log, args, ckpt, model, dataset, step, run_dir)
    # The plain module, saved without DDP/compile prefixes.
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world > 1:
        device_ids = [device.index] if device.type == 'cuda' else None
        # Gradients live in the all-reduce buckets (no copy); 100 MB buckets: 24 for SiT-XL/2's
        # 2.6 GB of fp32 gradients (25 MB, the default: 59), each a subgraph under --compile.
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                    gradient_as_bucket_view=True, bucket_cap_mb=100)
    # The second objective's loss.
    if args.objective == 'meanflow':
        mf = args.meanflow
        loss_fn = partial(meanflow_loss, raw_model=raw_model, omega=mf['omega'],
                          kappa=mf['kappa'], p=mf['p'], eps=mf['eps'])
    else:
        loss_fn = partial(flow_matching_loss, pred=args.pred)

    # -- the loop: inputs -> loss -> gradient -> clip -> AdamW -> EMA; a log line every log_every
    #    steps, a checkpoint every ckpt_every. The data position follows from the step: a resume
    #    continues the epoch.
    mixed_precision, generator = autocast(device), torch.Generator(device=device)
    steps_per_epoch = len(dataset) // args.global_batch_size
    warmup_steps = args.warmup_epochs * steps_per_epoch
    local_batch = args.global_batch_size // world
    micro = local_batch // args.grad_accum
    # Running sums of loss, denoise, align and grad norm.
    sums = torch.zeros(4, device=device)
    t0, last_step = time.time(), step
    model.train()
    while step < args.max_steps:
        epoch, start = divmod(step, steps_per_epoch)
        epoch_batches = global_batches(len(dataset), args.global_batch_size, args.seed, epoch)
        batches = [b[rank * local_batch:(rank + 1) * local_batch] for b in epoch_batches[start:]]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                             num_workers=args.num_workers,
                                             pin_memory=device.type == 'cuda')
        # A prepared latent folder also gives the SD-VAE's stored moments.
        for images, labels, *moments in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            moments = moments[0].to(device, non_blocking=True) if moments else None
            x, y, noise, t, target = training_inputs(
                images, labels, step, args, rank=rank, world=world, generator=generator,
                sd_vae=sd_vae, encoder=encoder, mixed_precision=mixed_precision, moments=moments)
            # JiT: linear warm-up, then constant.
            if warmup_steps:
                for group in opt.param_groups:
                    group['lr'] = args.lr * min(1.0, step / warmup_steps)
            # Micro-batches of this rank's slice.
            for k in range(args.grad_accum):
                mb = slice(k * micro, (k + 1) * micro)
                # The gradients are all-reduced on the last micro-batch only.
                if world > 1:
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

            if step % args.log_every == 0 or step == args.max_steps:
                if world > 1:
                    # Sum over ranks (gloo has no AVG).
                    dist.all_reduce(sums)
                loss, denoise, align, grad_norm = (sums / ((step - last_step) * world)).tolist()
                if not math.isfinite(loss):
                    fail(f"loss is {loss} at step {step}; stopping. The last good checkpoint is in "
                         f"{run_dir}/checkpoints (a new run with a lower --lr may help)")
                dt = (time.time() - t0) / (step - last_step)
                name = 'mf' if args.objective == 'meanflow' else 'fm'
                log(f"step {step}/{args.max_steps} | loss {loss:.4f} "
                    f"({name} {denoise:.4f}, align {align:.4f}) | grad {grad_norm:.3f} | "
                    f"{dt * 1000:.0f} ms | {args.global_batch_size / dt:.0f} img/s")
                sums.zero_()
                t0, last_step = time.time(), step
            if step % args.ckpt_every == 0 or step == args.max_steps:
                save_run(log, run_dir, step, raw_model, ema, opt, args, master)
            if step >= args.max_steps:
                break
    wait_for_save(last=True)
    if master and args.setting == 'demo':
        print(f"demo: now sample a grid with  python sample.py --ckpt {run_dir}", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return run_dir

@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (DiT's update_ema)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)

def step_seed(seed, step):
    """The seed of a step's generator: the run seed hashed to 32 bits (numpy's SeedSequence; torch's
    CPU generator keeps only 32 bits of a seed, so seed * 2**32 + step would give every run seed the
    same draws), plus the step."""
    return (int(np.random.SeedSequence(seed).generate_state(1)[0]) + step) % 2 ** 32

# =============================================================================
# Appendix: what a real run needs and a learner can skip
# =============================================================================

# -----------------------------------------------------------------------------
# A. Processes and precision: DDP set-up (torchrun), bf16 autocast

def setup_distributed():
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; otherwise one process on cuda, mps or cpu.
    TF32 matmuls on CUDA."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if 'RANK' in os.environ:
        rank = int(os.environ['RANK'])
        local_rank = int(os.environ['LOCAL_RANK'])
        world = int(os.environ['WORLD_SIZE'])
        if torch.cuda.is_available():
            device = torch.device('cuda', local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device('cpu')
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
        return rank, world, device
    if torch.cuda.is_available():
        return 0, 1, torch.device('cuda')
    return 0, 1, torch.device('mps' if torch.backends.mps.is_available() else 'cpu')

@contextlib.contextmanager
def node_first(world):
    """The first process of each node runs the block, then the node's others do (every process
    passes one barrier): a download into a node's cache (torch.hub, the VAE) happens once a node."""
    first = int(os.environ.get('LOCAL_RANK', 0)) == 0
    if world > 1 and not first:
        dist.barrier()
    yield
    if world > 1 and first:
        dist.barrier()

def attention(q, k, v):
    """softmax(q k^T / sqrt(hs)) v for q, k, v (B, nh, T, hs). PyTorch's fused kernel, except on a
    CPU under bf16 autocast, where the explicit form is faster at SiT's lengths (bench.py)."""
    if q.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
        att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5                   # (B, nh, T, T)
        return att.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v         # softmax in fp32
    return F.scaled_dot_product_attention(q, k, v)

def cpu_has_bf16():
    """Native bf16 matmuls: x86 AVX512-BF16 or AMX, or Arm's BF16 extension
    (Linux /proc/cpuinfo flags)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})

def precision(device):
    """'bf16' where the hardware computes bf16 natively (CUDA, and CPUs with bf16 instructions,
    where autocast is 2-3x faster than fp32 in bench.py), else 'fp32'. IREPA_PRECISION=fp32
    (or bf16) in the environment forces it."""
    want = os.environ.get('IREPA_PRECISION', 'auto')
    # Set by hand: bad input gets a one-line error.
    if want not in ('auto', 'bf16', 'fp32'):
        fail(f"IREPA_PRECISION={want}: use auto, bf16 or fp32")
    if device.type not in ('cuda', 'cpu'):
        return 'fp32'
    if want == 'auto':
        return 'bf16' if device.type == 'cuda' or cpu_has_bf16() else 'fp32'
    return want

def autocast(device):
    """The forward passes' context: bf16 autocast or nothing. Losses are reduced in float32 either
    way (flow_matching_loss, alignment_loss); samplers keep their state in float64."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision(device) == 'bf16')

# -----------------------------------------------------------------------------
# B. Data sources and frozen networks: class folders that survive bad files, the demo's shapes and
#    its weight-free HOG target, torch.hub offline, the SD-VAE

def center_crop_arr(pil_image, image_size):
    """ADM: halve with BOX while the short side is >= 2S, BICUBIC so the short side is S,
    crop the centre."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.ppm')

class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image>; labels follow the sorted class names. Items: (uint8 (3, S, S), label).
    A corrupt or unreadable image is skipped with a warning naming the file (its slot returns the
    next readable image), so one bad JPEG cannot kill a week-long run; `self.bad` lists the
    skipped files."""
    def __init__(self, root, image_size):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data-path {root} is not a folder")
        # Hidden files are not images, hidden folders not classes.
        images = {d.name: [os.path.join(dp, f)
                           for dp, _, files in sorted(os.walk(d.path), key=lambda w: w[0])
                           for f in sorted(files)
                           if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith('.')]
                  for d in os.scandir(root) if d.is_dir() and not d.name.startswith('.')}
        empty = sorted(c for c, files in images.items() if not files)
        if empty:
            warnings.warn(f"{root}: folder(s) without images are not classes: {', '.join(empty)}")
        self.classes = sorted(c for c, files in images.items() if files)
        self.samples = [(path, label) for label, c in enumerate(self.classes) for path in images[c]]
        if not self.samples:
            raise FileNotFoundError(f"no images in {root}: "
                                    f"expected root/<class name>/<image>{IMG_EXTENSIONS}")
        self.image_size, self.bad = image_size, set()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        # 100 unreadable images in a row mean something systematic.
        for i in range(min(len(self.samples), 100)):
            path, label = self.samples[(idx + i) % len(self.samples)]
            try:
                with Image.open(path) as im:
                    arr = center_crop_arr(im.convert('RGB'), self.image_size)
                return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), label
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
                if path not in self.bad:
                    self.bad.add(path)
                    warnings.warn(f"skipping unreadable image {path} ({why}); "
                                  f"{len(self.bad)} skipped so far in this process")
        raise RuntimeError(f"{i + 1} images in a row are unreadable in "
                           f"{os.path.dirname(os.path.dirname(path))}, the last {path} ({why})")

class Shapes(torch.utils.data.Dataset):
    """Procedural data, one class per shape: a bright shape of random colour, size and position on a
    dark background. Offline stand-in for ImageNet in the demo and the tests;
    deterministic per index."""
    classes = ['circle', 'square', 'triangle', 'cross']

    def __init__(self, num_samples=10000, image_size=32, seed=0):
        self.num_samples, self.image_size, self.seed = num_samples, image_size, seed

    def __len__(self):
        return self.num_samples

    def __getitem__(self, idx):
        rng = np.random.default_rng([self.seed, idx])
        label = idx % len(self.classes)
        # Draw at 4x, then downsample: antialiasing.
        S = 4 * self.image_size
        bg = tuple(int(v) for v in rng.integers(0, 70, 3))
        fg = tuple(int(v) for v in rng.integers(140, 256, 3))
        im = Image.new('RGB', (S, S), bg)
        d = ImageDraw.Draw(im)
        r = S * rng.uniform(0.22, 0.34)
        cx, cy = S / 2 + S * rng.uniform(-0.12, 0.12, 2)
        if label == 0:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        elif label == 1:
            d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fg)
        elif label == 2:
            d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fg)
        else:
            w = r * 0.35
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
        im = im.resize((self.image_size, self.image_size), resample=Image.BOX)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous(), label

class HOG(nn.Module):
    """Weight-free Histogram of Oriented Gradients target (Dalal & Triggs 2005), one cell per SiT
    token. The paper (section 3) shows such classical descriptors work as REPA targets: they are
    pure spatial structure. Per cell: 9 unsigned-orientation bins, magnitude-weighted with linear
    bin interpolation; the token of a cell is its histogram as normalised in each of the 4
    overlapping 2x2-cell blocks that contain it (L2-Hys on each 36-d block vector), giving
    4 * 9 = 36 dims per token."""
    def __init__(self, grid_size, cell=8, bins=9):
        super().__init__()
        self.grid_size = grid_size
        self.cell = cell
        self.bins = bins
        self.embed_dim = 4 * bins
        self.name = 'hog'

    # img: (B, 3, H, W) in 0..255.
    def forward(self, img):
        G, c, nb = self.grid_size, self.cell, self.bins
        x = F.interpolate(img.float() / 255, size=(G * c, G * c), mode='bilinear', antialias=True,
                          align_corners=False)
        xp = F.pad(x, (1, 1, 1, 1), mode='replicate')
        gx = xp[:, :, 1:-1, 2:] - xp[:, :, 1:-1, :-2]                          # [-1, 0, 1] filters
        gy = xp[:, :, 2:, 1:-1] - xp[:, :, :-2, 1:-1]
        mag = torch.sqrt(gx ** 2 + gy ** 2)                                     # (B, 3, S, S)
        # The strongest colour channel per pixel.
        best = mag.argmax(dim=1, keepdim=True)
        mag, gx, gy = (a.gather(1, best) for a in (mag, gx, gy))                # (B, 1, S, S)
        # The unsigned orientation in [0, pi).
        ang = torch.atan2(gy, gx) % math.pi
        # Bin centres at (i + 0.5) * pi / nb.
        pos = ang / math.pi * nb - 0.5
        lo = torch.floor(pos)
        w_hi = pos - lo
        bins = torch.arange(nb, device=x.device).view(1, nb, 1, 1)
        hist = (mag * (1 - w_hi) * (bins == lo.long() % nb)
                + mag * w_hi * (bins == (lo.long() + 1) % nb))
        # The histograms summed per cell, (B, nb, G, G).
        return self.block_features(F.avg_pool2d(hist, c) * c * c)

    def block_features(self, hist):
        """(B, nb, G, G) cell histograms -> (B, G*G, 4 * nb) tokens."""
        G = self.grid_size
        # Dalal-Triggs blocks of 2x2 cells (stride 1, edges replicated): each 36-d block vector is
        # L2-normalised, clipped at 0.2 and renormalised as a whole (L2-Hys), so a cell keeps its
        # block's local contrast.
        hp = F.pad(hist, (1, 1, 1, 1), mode='replicate')                        # (B, nb, G+2, G+2)
        blocks = torch.stack([hp[:, :, dy:dy + G + 1, dx:dx + G + 1]
                              for dy in (0, 1) for dx in (0, 1)], 2)          # (B, nb, 4, G+1, G+1)
        blocks = blocks / torch.sqrt(blocks.pow(2).sum((1, 2), keepdim=True) + 1e-6)
        blocks = blocks.clamp(max=0.2)
        blocks = blocks / torch.sqrt(blocks.pow(2).sum((1, 2), keepdim=True) + 1e-6)
        # The 4 blocks containing each cell; k is where the cell sits in that block.
        feats = []
        for by in (0, 1):
            for bx in (0, 1):
                k = (1 - by) * 2 + (1 - bx)
                feats.append(blocks[:, :, k, by:by + G, bx:bx + G])              # (B, nb, G, G)
        return grid_to_tokens(torch.cat(feats, dim=1))                          # (B, G*G, 36)

def hub_family(name):
    """'dinov2', 'dinov3' or 'dino' (DINOv1) from an entry's name; another --hub-dir entry
    counts as DINOv2-like."""
    default = 'dino' if name in DINOV1 else 'dinov2'
    return next((f for f in ('dinov2', 'dinov3') if name.startswith(f + '_')), default)

# DINOv3's weights are gated (granted on request, facebookresearch/dinov3's README): the file a
# download gives, looked for beside the other hub weights.
DINOV3_WEIGHTS = {'dinov3_vits16': 'dinov3_vits16_pretrain_lvd1689m-08c60483.pth',
                  'dinov3_vitb16': 'dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth',
                  'dinov3_vitl16': 'dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth'}

def hub_load(name, hub_repo=None):
    """torch.hub, offline when possible: an explicit local hub directory (--hub-dir), else the hub
    cache ($TORCH_HOME/hub/facebookresearch_<family>_main), else GitHub. Weights:
    $TORCH_HOME/hub/checkpoints/ (DINOv3's must be put there by hand)."""
    family = hub_family(name)
    github = HUB_FAMILIES[family]
    cached = os.path.join(torch.hub.get_dir(), github.replace('/', '_') + '_main')
    checkpoints = os.path.join(torch.hub.get_dir(), 'checkpoints')
    # --hub-dir, else the hub cache.
    local = hub_repo
    if local is None and os.path.isfile(os.path.join(cached, 'hubconf.py')):
        local = cached
    kwargs = {}
    if name in DINOV3_WEIGHTS:
        kwargs['weights'] = os.path.join(checkpoints, DINOV3_WEIGHTS[name])
        if not os.path.isfile(kwargs['weights']):
            raise RuntimeError(f"encoder '{name}': DINOv3's weights are gated; request them "
                               f"(facebookresearch/dinov3's README) and put {DINOV3_WEIGHTS[name]} "
                               f"in {checkpoints} (set TORCH_HOME to move it)")
    old_timeout = socket.getdefaulttimeout()
    # A stalled network then fails instead of hanging.
    socket.setdefaulttimeout(60)
    try:
        if local is not None:
            return torch.hub.load(local, name, source='local', **kwargs)
        return torch.hub.load(f'{github}:main', name, **kwargs)
    except Exception as e:
        if hub_repo is None:
            hint = (f"Offline? Put the {github} repo in {cached} and its weights in {checkpoints}, "
                    f"or pass --hub-dir DIR (a folder with hubconf.py).")
        elif not os.path.isfile(os.path.join(hub_repo, 'hubconf.py')):
            hint = "--hub-dir must be a folder with hubconf.py."
        # torch.hub's words for a missing entry.
        elif 'Cannot find callable' in str(e):
            hint = f"Is '{name}' an entry of {os.path.join(hub_repo, 'hubconf.py')}?"
        else:
            hint = f"Offline? The weights go in {checkpoints}."
        raise RuntimeError(f"could not load encoder '{name}' through torch.hub from "
                           f"{local or 'github ' + github} ({type(e).__name__}: {e}). {hint}") from e
    finally:
        socket.setdefaulttimeout(old_timeout)

class SDVAE:
    """The latent setting's frozen SD-VAE (vae.py; iREPA Appendix G): images in [-1, 1] <-> the
    normalised latents SiT is trained on, (latent - bias) * scale with the official
    per-channel statistics. With `stats` (a prepared folder's scale and bias) no weights are
    loaded: the step samples from the stored moments and never runs the encoder."""
    def __init__(self, device, stats=None):
        # vae.py, a sibling file that needs only torch.
        import vae
        self.lib = vae
        if stats is None:
            self.vae, self.scale, self.bias = vae.load_vae(device=device)
        else:
            self.vae = None
            self.scale, self.bias = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in stats)

    @torch.no_grad()
    def sample(self, mean, logvar, eps):
        """The normalised posterior sample of moments mean, logvar (B, 4, h, w)."""
        latent = self.lib.sample_posterior(mean, logvar, eps)
        return self.lib.normalize_latents(latent, self.scale, self.bias)

    @torch.no_grad()
    def encode(self, x, eps):
        """x (B, 3, H, W) -> (B, 4, H/8, W/8), in fp32 (TF32 on CUDA), as in DiT's train.py."""
        return self.sample(*self.vae.encode(x), eps)

    @torch.no_grad()
    def decode(self, latent):
        """latent (B, 4, h, w) -> (B, 3, 8h, 8w)."""
        return self.vae.decode(self.lib.denormalize_latents(latent, self.scale, self.bias))

PREPARED_FORMAT = 'irepa-prepared-v1'

def prepared_shard(kind, n, image_size):
    """(shape, dtype) of a prepared folder's shard of n images: 'images' (n, S, S, 3) uint8, the
    ADM crops; 'moments' (n, 8, S/8, S/8) float32, the SD-VAE's mean and logvar."""
    S = image_size
    if kind == 'images':
        return (n, S, S, 3), np.dtype(np.uint8)
    return (n, 8, S // 8, S // 8), np.dtype(np.float32)

def open_shard(path):
    """A shard of a prepared folder, memory-mapped; the 64 last used stay open in each process (each
    holds a file), and a file rewritten since is opened anew."""
    return memory_map(path, os.path.getmtime(path))

@lru_cache(maxsize=64)
def memory_map(path, mtime):
    return np.load(path, mmap_mode='r')

def npy_shape(path):
    """(shape, dtype) from an .npy file's header; ValueError if the file is shorter than its data."""
    with open(path, 'rb') as f:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
        if f.tell() + math.prod(shape) * dtype.itemsize > os.path.getsize(path):
            raise ValueError("shorter than its header says")
    return shape, dtype

class PreparedFolder(torch.utils.data.Dataset):
    """A folder written by prepare.py: manifest.json, images-NNNNN.npy (uint8 (n, S, S, 3), ADM
    center crops) and, for the latent setting, moments-NNNNN.npy (float32 (n, 8, S/8, S/8): the
    SD-VAE's mean and logvar), read memory-mapped. Items: (uint8 (3, S, S), label), plus the
    moments (8, S/8, S/8) when `vae` names the VAE they were made with. Checked at start: complete,
    the resolution, crop and VAE of this run, every shard's size, the image count."""
    def __init__(self, root, image_size, vae):
        path = os.path.join(root, 'manifest.json')
        try:
            with open(path) as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
        if m.get('format') != PREPARED_FORMAT:
            raise ValueError(f"{path} is not a prepare.py manifest ({PREPARED_FORMAT})")
        if not m['complete']:
            raise ValueError(f"{root} is not complete: run prepare.py again to finish it")
        if m['resolution'] != image_size:
            raise ValueError(f"{root} was prepared at {m['resolution']} px; this run trains at "
                             f"{image_size} px (--image-size)")
        if m['crop'] != 'adm-center':
            raise ValueError(f"{root} holds {m['crop']} crops; this code trains on ADM's center crop")
        if m['vae'] != vae:
            if vae is None:
                why = f"holds {m['vae']} moments; this run has no VAE: prepare it with --vae none"
            elif m['vae'] is None:
                why = "has no VAE moments; the latent setting needs them (prepare.py without --vae none)"
            else:
                why = f"holds {m['vae']} moments; this run's VAE is {vae}"
            raise ValueError(f"{root} {why}")
        self.classes = m['class_names']
        self.labels = np.repeat(np.arange(len(self.classes)), m['class_counts'])   # class-major order
        self.latent_stats = (m['latents_scale'], m['latents_bias']) if vae else None
        self.shard_size = m['shard_size']
        num_shards = -(-len(self.labels) // self.shard_size)
        self.files = {kind: [os.path.join(root, f'{kind}-{k:05d}.npy') for k in range(num_shards)]
                      for kind in (('images', 'moments') if vae else ('images',))}
        if len(self.labels) != m['count']:
            raise ValueError(f"{root}: its manifest says {m['count']} images, its class counts "
                             f"{len(self.labels)}")
        for kind, paths in self.files.items():
            for k, p in enumerate(paths):
                try:
                    shape, dtype = npy_shape(p)
                except (OSError, ValueError) as e:
                    raise ValueError(f"{p} is truncated or unreadable ({e}); run prepare.py again "
                                     f"to rewrite it (delete it first)") from None
                n = min(self.shard_size, m['count'] - k * self.shard_size)
                want_shape, want_dtype = prepared_shard(kind, n, image_size)
                if (shape, dtype) != (want_shape, want_dtype):
                    raise ValueError(f"{p} holds {dtype} {shape}, not {want_dtype} {want_shape}: "
                                     f"its manifest says {m['count']} images")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        k, i = divmod(idx, self.shard_size)
        image = torch.from_numpy(np.array(open_shard(self.files['images'][k])[i]))   # (S, S, 3)
        item = (image.permute(2, 0, 1).contiguous(), int(self.labels[idx]))
        if 'moments' in self.files:
            item += (torch.from_numpy(np.array(open_shard(self.files['moments'][k])[i])),)
        return item

# -----------------------------------------------------------------------------
# C. Bad input: one-line errors, range checks and the invariants checked before anything
#    heavy starts

HUB_INTERFACE = ("DINOv2's interface (.embed_dim, .patch_size, and "
                 "forward_features(x)['x_norm_patchtokens'] of shape (B, tokens, embed_dim)), "
                 "which a --hub-dir entry needs")

def hub_patch_size(model, name):
    """The input pixels per token side of a hub encoder (DINOv1 keeps it on patch_embed); a
    --hub-dir entry without DINOv2's interface fails here with one line."""
    patch_embed = getattr(model, 'patch_embed', None)
    p = getattr(model, 'patch_size', 0) or getattr(patch_embed, 'patch_size', 0)
    if not (p and hasattr(model, 'embed_dim')):
        raise RuntimeError(f"encoder '{name}' ({type(model).__name__}) lacks {HUB_INTERFACE}")
    return p

def fail(msg):
    """A one-line error for bad input, instead of a traceback from deep inside; named after the
    script that runs (irepa.py, sample.py, metrics.py), as argparse names its own errors."""
    sys.exit(f"{os.path.basename(sys.argv[0])}: error: {msg}")

def call_or_fail(fn, *args):
    """fn(*args), with this file's errors for bad input (no images, an unknown encoder, not a
    checkpoint, offline without the weights: ValueError, RuntimeError, FileNotFoundError)
    as one fail() line."""
    try:
        return fn(*args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(str(e))

def check_ranges(args, bounds, recipe=()):
    """fail() at the first setting out of range. bounds {name: lo} means lo <= value,
    {name: (lo, hi)} means lo <= value <= hi; a value must be finite (NaN and inf fail), None is
    unset and passes. Names in `recipe` are recipe entries, not flags."""
    for name, b in bounds.items():
        (lo, hi), v = b if isinstance(b, tuple) else (b, math.inf), getattr(args, name)
        if v is not None and not (lo <= v <= hi and math.isfinite(v)):
            what = f"the recipe's {name}" if name in recipe else f"--{name.replace('_', '-')}"
            fail(f"{what} must be {f'>= {lo}' if hi == math.inf else f'in [{lo}, {hi}]'}, got {v}")

def output_dir_problem(path):
    """Creates the output folder `path`; returns why it cannot be one
    (a one-line reason), or None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file, not a folder"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return f"{path}: cannot create it ({e.strerror})"
    return None if os.access(path, os.W_OK) else f"{path} is not writable"

def configure(args, tokens, parser):
    """nanoGPT's configurator: --key=value sets any key of the configuration that has no flag of its
    own (ema_decay, spnorm_gamma, proj_kernel, hflip, ...), and --key.entry=value one entry of a
    dict (--sampler.num_steps=12). The value is a Python literal of a type the key has in some
    recipe or flag (an int where a float is; None where some recipe has None: --clip_grad=None);
    anything else fails with one line."""
    import ast
    recipes = [COMMON, MEANFLOW, *RECIPES.values()]
    flag_types = {a.dest: a.type or (bool if a.const in (True, False) else None) for a in parser._actions}
    for tok in tokens:
        key, eq, text = tok.removeprefix('--').partition('=')
        name, _, entry = key.replace('-', '_').partition('.')
        if not (tok.startswith('--') and eq and hasattr(args, name)):
            fail(f"unrecognised argument {tok}: use a flag (--help) or --key=value with a key "
                 f"of the configuration: {', '.join(sorted(vars(args)))}")
        if entry and not isinstance(getattr(args, name), dict):
            fail(f"{tok}: {name} is not a dict; set it as --{name}=value")
        # A copy: never the recipe's dict.
        holder = dict(getattr(args, name)) if entry else vars(args)
        key = entry or name
        if key not in holder:
            fail(f"{tok}: {name} has no entry '{key}'")
        seen = [holder[key]] + [r[name].get(entry) if entry else r[name] for r in recipes
                                if name in r and (not entry or isinstance(r[name], dict))]
        types = {type(v) for v in seen if v is not None}
        if not entry and flag_types.get(name):
            types.add(flag_types[name])
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text                                                        # a plain string
        if float in types and type(value) is int:
            value = float(value)
        if tuple in types and type(value) is list:
            value = tuple(value)
        ok = type(value) in types or not types or (value is None and None in seen)
        if not ok:
            kinds = ' or '.join(sorted(t.__name__ for t in types)) + (' or None' if None in seen else '')
            fail(f"{tok}: {key} takes {kinds}, not {type(value).__name__} {value!r}")
        holder[key] = value
        if entry:
            setattr(args, name, holder)

def check_settings(args):
    """Every numeric setting in range, and the output folder usable, before anything
    heavy starts."""
    check_ranges(args, dict(image_size=1, global_batch_size=1, grad_accum=1, max_steps=1,
                            ckpt_every=1, log_every=1, num_workers=0, seed=0, proj_coeff=0,
                            spnorm_gamma=(0, 1)), recipe=('spnorm_gamma',))
    if not 0 < args.lr < math.inf:
        fail(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.ema_decay < 1:
        fail(f"the recipe's ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.projector not in ('mlp', 'conv') or args.pred not in ('v', 'x'):
        fail(f"projector must be mlp or conv and pred v or x, got {args.projector} and {args.pred}")
    check_ranges(args, dict(proj_kernel=1), recipe=('proj_kernel',))
    if args.objective == 'meanflow':
        check_ranges(argparse.Namespace(**args.meanflow),
                     dict(ratio=(0, 1), omega=-math.inf, kappa=-math.inf, p=0, eps=0),
                     recipe=('ratio', 'omega', 'kappa', 'p', 'eps'))
        # Else the weight is 1 / (0 + 0)^p on an exact fit.
        if args.meanflow['p'] > 0 and args.meanflow['eps'] == 0:
            fail("the recipe's eps must be > 0 when p > 0 (the loss weight is 1 / (error + eps)^p)")
    if not args.resume and (problem := output_dir_problem(args.results_dir)):
        fail(f"--results-dir {problem}")

def check_batch_split(args, world):
    if args.global_batch_size % (world * args.grad_accum):
        fail(f"--global-batch-size {args.global_batch_size} is not divisible by world size {world} "
             f"x --grad-accum {args.grad_accum}")

def check_model(args):
    """The model-shape invariants, before anything heavy starts. Returns the model's patch size."""
    # The size's keywords: patch_size, depth, encoder_depth, ...
    size_cfg = SiT_models[args.model].keywords
    patch, depth = size_cfg['patch_size'], size_cfg['depth']
    if args.encoder not in ENCODERS + ('none',) and not args.hub_dir:
        fail(f"unknown encoder '{args.encoder}'; choose one of: {', '.join(ENCODERS)}, none, "
             f"or an entry of the hubconf.py in --hub-dir")
    # The SD-VAE downsamples by 8.
    token_px = 8 ** bool(args.vae) * patch
    if args.image_size % token_px:
        fail(f"--image-size {args.image_size} is not divisible by the patch size of {args.model}"
             + (" x 8 (the VAE's downsampling)" if args.vae else ""))
    if args.encoder != 'none' and args.spatial_norm and (args.image_size // token_px) ** 2 < 2:
        fail(f"{args.model} at {args.image_size} px has one token: the spatial norm's statistics "
             f"over tokens need 2; raise --image-size, or use a smaller patch")
    if args.encoder_depth is not None and not 1 <= args.encoder_depth <= depth:
        fail(f"--encoder-depth {args.encoder_depth} is outside 1..{depth}, "
             f"the blocks of {args.model}")
    if args.proj_kernel % 2 == 0:
        fail(f"the recipe's proj_kernel must be odd (a 'same' conv on the token grid), "
             f"got {args.proj_kernel}")
    return patch

def open_dataset(args, ckpt):
    """The training images: a prepared folder (prepare.py; it has manifest.json), class folders, or
    without --data-path the demo's procedural shapes."""
    if args.data_path and os.path.isfile(os.path.join(args.data_path, 'manifest.json')):
        dataset = call_or_fail(PreparedFolder, args.data_path, args.image_size, args.vae)
        if args.vae and args.hflip:
            fail(f"{args.data_path}: its stored moments are of unflipped images; the latent setting "
                 f"trains without flips (hflip False)")
    elif args.data_path:
        dataset = call_or_fail(ImageFolder, args.data_path, args.image_size)
    else:
        dataset = Shapes(50_000, args.image_size, seed=args.seed)
    if len(dataset) < args.global_batch_size:
        fail(f"{len(dataset)} images are fewer than one global batch of {args.global_batch_size}")
    if ckpt is not None and list(dataset.classes) != ckpt['args']['class_names']:
        fail(f"the classes in {args.data_path} differ from the run's ({len(dataset.classes)} vs "
             f"{len(ckpt['args']['class_names'])}); --data-path may move the data, not change it")
    # Another number of images would give another epoch order.
    if ckpt is not None and len(dataset) != ckpt['args']['num_images']:
        fail(f"{args.data_path} has {len(dataset)} images, the run had {ckpt['args']['num_images']}; "
             f"--data-path may move the data, not change it")
    return dataset

def frozen_networks(args, dataset, grid, device, world):
    """The SD-VAE (latent setting; from a prepared folder only its latent statistics) and the
    alignment encoder, or None, each downloaded once a node (node_first). The encoder's token grid
    must be SiT's."""
    sd_vae = None
    encoder = None
    with node_first(world):
        if args.vae:
            # A one-line error when the VAE files are missing.
            sd_vae = call_or_fail(SDVAE, device, getattr(dataset, 'latent_stats', None))
        if args.encoder != 'none':
            encoder = call_or_fail(load_encoder, args.encoder, grid, args.hub_dir, device)
    if encoder is not None:
        # A --hub-dir entry may be anything.
        try:
            with torch.no_grad():
                blank = torch.zeros(1, 3, args.image_size, args.image_size, device=device)
                T = encoder(blank).shape[1]
        except Exception as e:
            if args.encoder in ENCODERS or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            fail(f"encoder {args.encoder} failed on a blank image ({type(e).__name__}: {e}); "
                 f"does it have {HUB_INTERFACE}?")
        if T != grid * grid:
            fail(f"encoder {args.encoder} gives {T} tokens but {args.model} at {args.image_size} px has a "
                 f"{grid}x{grid} grid; change --image-size or --model so the grids match")
    return sd_vae, encoder

# -----------------------------------------------------------------------------
# D. Runs: names, logs, atomic checkpoints and exact resume (a resume continues the run with its
#    own settings)

def derive_args(args, dataset, encoder, world, device):
    """The values the configuration gets at start, from the data, the encoder and the machine."""
    args.num_classes = len(dataset.classes)
    args.class_names = list(dataset.classes)
    args.num_images = len(dataset)
    # REPA's choice per size.
    if args.encoder_depth is None:
        args.encoder_depth = SiT_models[args.model].keywords['encoder_depth']
    args.target_dim = encoder.embed_dim if encoder is not None else None
    args.method = method_name(args)
    args.world_size = world
    args.precision = precision(device)

def method_name(args):
    """What is trained, in words: 'vanilla' (plain SiT), 'repa', 'irepa', or one of iREPA's halves
    ('conv-only': conv projector on raw targets; 'spnorm-only': REPA's MLP on spatially
    normalised targets)."""
    if args.encoder == 'none':
        return 'vanilla'
    return {('mlp', False): 'repa', ('conv', True): 'irepa', ('conv', False): 'conv-only',
            ('mlp', True): 'spnorm-only'}[args.projector, bool(args.spatial_norm)]

def run_name(args):
    """<setting>-<model>-<encoder>-<method>, e.g.
    latent-SiT-XL-2-dinov2_vitb14-irepa, demo-SiT-T-4-vanilla."""
    target = '' if args.encoder == 'none' else f"{args.encoder}-"
    objective = '-meanflow' if args.objective == 'meanflow' else ''
    return f"{args.setting}-{args.model.replace('/', '-')}-{target}{method_name(args)}{objective}"

def new_run_dir(args, master, world):
    """results_dir/<run name>, with -1, -2, ... if taken; chosen by rank 0."""
    run_dir = os.path.join(args.results_dir, run_name(args))
    if master and os.path.exists(run_dir):
        i = 1
        while os.path.exists(f"{run_dir}-{i}"):
            i += 1
        run_dir = f"{run_dir}-{i}"
    if world > 1:
        obj = [run_dir]
        dist.broadcast_object_list(obj, src=0)
        run_dir = obj[0]
    return run_dir

class Logger:
    """print + append to <run>/log.txt, on rank 0 only (which also makes the
    run's checkpoints/ folder)."""
    def __init__(self, run_dir, active):
        self.path, self.active = os.path.join(run_dir, 'log.txt'), active
        if active:
            os.makedirs(os.path.join(run_dir, 'checkpoints'), exist_ok=True)

    def __call__(self, msg):
        if self.active:
            print(msg, flush=True)
            with open(self.path, 'a') as f:
                f.write(msg + '\n')

def log_start(log, args, ckpt, model, dataset, step, run_dir):
    """Provenance (versions, device, precision, parameters), every resolved setting,
    and what this run is."""
    device = next(model.parameters()).device
    log(f"provenance: torch {torch.__version__} | cuda {torch.version.cuda} | python {platform.python_version()} | "
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type} x "
        f"{args.world_size} | precision {args.precision} | encoder {args.encoder} | "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M params")
    log(f"args: {json.dumps(vars(args))}")
    log(f"run: {args.setting} setting, {args.model}, {args.method}"
        + (f" with the {args.encoder} target" if args.encoder != 'none' else '')
        + f" | {len(dataset)} images, {len(dataset.classes)} classes | {'resuming at' if step else 'starting at'} "
          f"step {step} | {run_dir}")
    setting_pred = RECIPES[args.setting]['pred']
    if args.objective == 'meanflow' and setting_pred != args.pred:
        log(f"note: MeanFlow's network outputs the average velocity u: the {args.setting} setting's "
            f"{setting_pred}-prediction does not apply")
    if ckpt is not None and ckpt['args']['precision'] != args.precision:
        log(f"note: the run trained in {ckpt['args']['precision']} until now and goes on in {args.precision} "
            f"(IREPA_PRECISION or the machine): not bit-identical to a run without the break")

def save_checkpoint(path, ckpt):
    """Atomic: write a temp file, then rename, so a kill mid-write never corrupts
    the last good one."""
    tmp = path + '.tmp'
    torch.save(ckpt, tmp)
    os.replace(tmp, path)

def save_run(log, run_dir, step, model, ema, opt, args, master):
    """The checkpoint <run>/checkpoints/<step>.pt: model, EMA, optimizer, args, step; atomically, by
    rank 0, and never with non-finite weights. Rank 0 copies the state to host memory and writes it
    in a background thread while training goes on (one save at a time: the next waits for it), so
    slow storage holds no rank. A save that fails is logged at once and training goes on (the next
    save tries again); main() waits for the last one, which must succeed."""
    if not all(torch.isfinite(p).all() for p in [*model.parameters(), *ema.parameters()]):
        fail(f"non-finite weights at step {step}; not saving. "
             f"The last good checkpoint is in {run_dir}/checkpoints")
    if master:
        state = host_copy(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                               args=vars(args), step=step))
        wait_for_save()
        path = os.path.join(run_dir, 'checkpoints', f"{step:07d}.pt")
        SAVING['thread'] = threading.Thread(target=background_save, args=(path, state, log))
        SAVING['thread'].start()

SAVING = dict(thread=None, error=None)       # the save in flight, and how it failed

def host_copy(obj):
    """A copy of a (nested) state dict with every tensor in host memory, detached from training."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj

def background_save(path, state, log):
    SAVING['error'] = None
    try:
        save_checkpoint(path, state)
        log(f"saved {path}")
    except Exception as e:
        SAVING['error'] = f"could not save {path} ({type(e).__name__}: {e})"
        log(f"warning: {SAVING['error']}; training goes on, the next checkpoint tries again")

def wait_for_save(last=False):
    """Waits for the save in flight; after the run's last save, a failure stops with one line."""
    if SAVING['thread'] is not None:
        SAVING['thread'].join()
        SAVING['thread'] = None
    if last and SAVING['error']:
        fail(SAVING['error'])

def checkpoints(run_dir):
    """A run's checkpoint files <step>.pt, oldest first (by step:
    10000000.pt comes after 9999999.pt)."""
    step = lambda path: int(name) if (name := os.path.basename(path)[:-3]).isdigit() else -1
    return sorted(glob.glob(os.path.join(run_dir, 'checkpoints', '*.pt')), key=step)

def latest_checkpoint(run_dir):
    return (checkpoints(run_dir) or [None])[-1]

def load_latest_checkpoint(run_dir):
    """The newest checkpoint of a run that loads; a truncated or corrupt one (a disk fault, a copy
    cut short) is skipped with a warning naming it, and leftovers of a save that was killed
    (*.tmp) are removed."""
    for tmp in glob.glob(os.path.join(run_dir, 'checkpoints', '*.tmp')):
        # Another rank removed it first.
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    for path in reversed(checkpoints(run_dir)):
        try:
            # weights_only: tensors and plain types. Memory-mapped: the weights and AdamW's moments
            # are read as the model and optimizer copy them, not held whole by every rank.
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except Exception as e:
            warnings.warn(f"skipping unreadable checkpoint {path} ({type(e).__name__}); "
                          f"trying the one before")
    fail(f"--resume {run_dir}: no readable checkpoint in {os.path.join(run_dir, 'checkpoints')}")

# What --resume may change (the schedule, the machine and how it splits the batch, where the data
# and hub copies live); every other setting comes from the checkpoint, so the run continues
# as it began.
RESUME_FLAGS = ('max_steps', 'ckpt_every', 'log_every', 'num_workers', 'compile', 'hub_dir', 'data_path',
                'grad_accum', 'resume')

def given_keys(argv):
    """The settings named on the command line, by flag or as --key=value (abbreviations are off, so
    every flag is spelled out)."""
    dest = {opt: a.dest for a in get_parser()._actions for opt in a.option_strings}
    keys = set()
    for tok in argv:
        opt = tok.split('=')[0]
        if opt in dest:
            keys.add(dest[opt])
        # A --key=value or --key.entry=value.
        elif tok.startswith('--') and '=' in tok:
            keys.add(opt[2:].replace('-', '_').split('.')[0])
    return keys

def resume_args(args, given, run_args):
    """The run's own settings, with the RESUME_FLAGS named on the command line. A flag that would
    change the training itself is refused."""
    if missing := sorted(set(vars(args)) - set(run_args) - {'meanflow'}):
        fail(f"--resume {args.resume}: its checkpoint has no {', '.join(missing)}: an older irepa.py wrote it; "
             f"resume it with the commit that wrote it")
    for k in sorted(given - set(RESUME_FLAGS)):
        if k in run_args and run_args[k] != getattr(args, k):
            fail(f"--resume continues the run as it began, but --{k.replace('_', '-')} {getattr(args, k)} differs from "
                 f"the run's {run_args[k]}; only --{', --'.join(f.replace('_', '-') for f in RESUME_FLAGS[:-1])} may "
                 f"change (start a new run to change the rest)")
    return argparse.Namespace(**{**run_args, **{k: getattr(args, k) for k in given & set(RESUME_FLAGS)}})

# -----------------------------------------------------------------------------
# E. A trained SiT read back from a checkpoint of this file or of the official code (for sample.py,
#    metrics.py)

def build_model(a):
    """A SiT (a MeanFlowSiT for --objective meanflow) from a run's configuration as a dict
    (vars(args), a checkpoint's 'args')."""
    sit = MeanFlowSiT if a.get('objective') == 'meanflow' else SiT
    # The size's depth, width, heads and patch.
    size = SiT_models[a['model']].keywords
    return sit(**dict(size, input_size=a['input_size'], in_channels=a['in_channels'],
                      num_classes=a['num_classes'], encoder_depth=a['encoder_depth'],
                      target_dim=a.get('target_dim'), projector=a.get('projector', 'mlp'), pred=a['pred'],
                      proj_kernel=a.get('proj_kernel', 3)))

# the official code's encoder names (ldm/vision_encoder.py: <type>-<arch>-<config>) -> this file's;
# the official code's other encoders (SigLIP, CLIP, MoCo v3, ...) are not loadable here
OFFICIAL_ENCODERS = {**{f'dinov2{r}-vit-{s}': f'dinov2_vit{s}14{"_" * bool(r)}{r}' for s in 'sblg'
                        for r in ('', 'reg')},
                     **{f'dinov3-vit-{s}{p}': f'dinov3_vit{s}16' for s in 'sbl' for p in ('', '16')},
                     **{f'dino-vit-{s}': f'dino_vit{s}16' for s in 'sb'}}

def official_checkpoint(ema, ns, model=None):
    """A checkpoint of the official iREPA code (End2End-Diffusion/iREPA ldm/train.py, its REPA and
    iREPA runs: weights 'ema', argparse.Namespace 'args') -> (state dict, args dict) in this file's
    terms. Its size is read off the weights (or given as `model`); its projector is wrapped as
    projectors.0.projection_layer.* (a 'linear' projector is a 1x1 conv here).
    Latent SiT, v-pred."""
    # iREPA's ldm/train.py always stores spnorm_method; sihyun-yu/REPA's train.py does not.
    if not hasattr(ns, 'spnorm_method'):
        raise ValueError("its args have no spnorm_method, so it is not from End2End-Diffusion/iREPA's ldm/train.py; "
                         "sihyun-yu/REPA's checkpoints train on latents scaled by 0.18215, not on the per-channel "
                         "statistics this code decodes with")
    if getattr(ns, 'path_type', 'linear') != 'linear':
        raise ValueError(f"its path_type is {ns.path_type}; "
                         f"this code trains and samples the linear path only")
    if getattr(ns, 'qk_norm', False):
        raise ValueError("it was trained with --qk-norm; this SiT has no q/k normalisation")
    if ',' in str(getattr(ns, 'enc_type', '')) or any(k.startswith('projectors.1.') for k in ema):
        raise ValueError(f"it aligns several encoders ({ns.enc_type}); this code aligns one")
    ema = {k.replace('projectors.0.projection_layer.', 'projectors.0.'): v for k, v in ema.items()}
    D, C, p, _ = ema['x_embedder.proj.weight'].shape
    depth = len({k.split('.')[1] for k in ema if k.startswith('blocks.')})
    if model is None:
        size = [s for s, cfg in SiT_sizes.items()
                if (cfg['depth'], cfg['hidden_size']) == (depth, D)]
        if not size or f'SiT-{size[0]}/{p}' not in SiT_models:
            raise ValueError(f"no SiT size with depth {depth}, width {D} and patch {p}; "
                             f"pass --model")
        model = f'SiT-{size[0]}/{p}'
    args = dict(model=model, input_size=math.isqrt(ema['pos_embed'].shape[1]) * p, in_channels=C,
                image_size=getattr(ns, 'resolution', 256),
                num_classes=ema['y_embedder.embedding_table.weight'].shape[0] - 1,
                encoder_depth=getattr(ns, 'encoder_depth', 8), pred='v', vae='sd-vae-ft-mse' if C == 4 else None,
                encoder=OFFICIAL_ENCODERS.get(getattr(ns, 'enc_type', None), 'none'),
                sampler=dict(mode='sde', num_steps=250, cfg_scale=1.0), official=True)
    # A conv (4-d) or linear (2-d) projector.
    if 'projectors.0.weight' in ema:
        w = ema['projectors.0.weight']
        ema['projectors.0.weight'] = w.view(*w.shape, 1, 1) if w.dim() == 2 else w
        args.update(projector='conv', target_dim=w.shape[0], proj_kernel=ema['projectors.0.weight'].shape[-1])
    elif 'projectors.0.4.weight' in ema:
        args.update(projector='mlp', target_dim=ema['projectors.0.4.weight'].shape[0])
    return ema, args

def load_sit(path, device='cpu', model=None):
    """The EMA SiT of a checkpoint, in eval mode, and the checkpoint's args (a dict). Reads this
    file's checkpoints and those of the official iREPA code (its REPA and iREPA runs), unpickling
    nothing but tensors, plain types and argparse.Namespace. `path` may be a run folder (its latest
    checkpoint). Raises ValueError with a one-line reason for a missing, truncated or
    foreign file."""
    # A run folder: its latest checkpoint.
    if os.path.isdir(path):
        folder, path = path, latest_checkpoint(path)
        if path is None:
            raise ValueError(f"no checkpoint at {os.path.join(folder, 'checkpoints')}")
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        # mmap: AdamW's moments stay on disk.
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} is truncated or not a torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        ema, args = ckpt['ema'], ckpt['args']
        if isinstance(args, argparse.Namespace):
            ema, args = official_checkpoint(ema, args, model)
        elif model is not None:
            args = dict(args, model=model)
        sit = build_model(args)
        sit.load_state_dict(ema)
    except Exception as e:
        raise ValueError(f"{path} is not an irepa.py or official iREPA (ldm/train.py) checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return sit.to(device).eval(), args

def hidden_state(model, x, t, y):
    """(h, h_proj): SiT's raw hidden state after block encoder_depth (B, T, D) and its
    projection (or None)."""
    h, c = model.embed(x, t, y)
    for block in model.blocks[:model.encoder_depth]:
        h = block(h, c)
    return h, model.project(h)

@torch.no_grad()
def noised_features(model, x, y, t, generator=None, sd_vae=None):
    """What the alignment loss sees, for analysis (metrics.py; iREPA Fig. 6c): SiT's hidden state h
    after block encoder_depth (B, T, D) and its projection (B, T, D_enc, None without an encoder),
    fp32, for images x (B, 3, H, W) in [-1, 1] noised to level t as in training (a latent SiT gets a
    posterior sample of the VAE first)."""
    # The VAE's eps is shaped like SiT's input.
    if sd_vae is not None:
        x = sd_vae.encode(x, torch.randn((len(x), model.in_channels, model.input_size, model.input_size),
                                          device=x.device, generator=generator))
    t = torch.full((len(x),), float(t), device=x.device)
    x_t, _ = interpolant(x, torch.randn(x.shape, device=x.device, generator=generator), t)
    with autocast(x.device):
        h, h_proj = hidden_state(model, x_t, t, y)
    return h.float(), None if h_proj is None else h_proj.float()

if __name__ == '__main__':
    main()

