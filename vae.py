"""
vae.py -- latent-space REPA/iREPA's frozen SD-VAE: stabilityai/sd-vae-ft-mse, f8, 4 latent channels.

The KL autoencoder of Latent Diffusion (Rombach et al. 2022, arXiv 2112.10752) as the official iREPA
code uses it (End2End-Diffusion/iREPA, `ldm/models/autoencoder.py`, `VAE_F8D4`): a 256 px image in
[-1, 1] becomes a 32x32x4 latent. Parameter names are the CompVis/LDM ones, so the official weights
load strictly by name: `pretrained_models/sdvae-ft-mse-f8d4.pt` (a plain state dict) and
`...-latents-stats.pt` (a dict with per-channel `latents_scale`, `latents_bias`) from Hugging Face
REPA-E/iREPA-collections, downloaded once into $TORCH_HOME/hub/checkpoints/ and read from there
offline.

With img (B, 3, 256, 256) in [-1, 1]:

    vae, scale, bias = load_vae(device='cuda')
    mean, logvar = vae.encode(img)                                      # each (B, 4, 32, 32)
    z = normalize_latents(sample_posterior(mean, logvar), scale, bias)  # what SiT is trained on
    img = vae.decode(denormalize_latents(z, scale, bias))               # back to [-1, 1]
"""
import os
import socket

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Building blocks (official ldm/models/autoencoder.py; no time embedding, no dropout in a VAE)

def Normalize(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)

class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x))))));
    a 1x1 conv `nin_shortcut` on x when the width changes."""
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.norm1, self.conv1 = Normalize(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = Normalize(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))

class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, q/k/v/proj_out as 1x1 convs, residual."""
    def __init__(self, ch):
        super().__init__()
        self.norm = Normalize(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # q, k, v each (B, 1, HW, C): one head, the H*W positions as the sequence
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)                     # softmax(q k^T / sqrt(C)) v
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)            # (B, C, H, W)
        return x + self.proj_out(h)

class Resample(nn.Module):
    """down: /2, one zero row and column padded at the bottom/right (asymmetric), then a 3x3
    stride-2 conv. up: x2, nearest-neighbour, then a 3x3 conv. The weights are `downsample.conv` /
    `upsample.conv`."""
    def __init__(self, ch, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        if self.down:
            x = F.pad(x, (0, 1, 0, 1))
        else:
            x = F.interpolate(x, scale_factor=2.0, mode='nearest')
        return self.conv(x)

def mid_blocks(ch):
    """The middle of encoder and decoder, at the lowest resolution:
    res block, attention, res block."""
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)
    return mid

def resolution_level(in_ch, out_ch, n_blocks, resample_name, resample):
    """n res blocks (`block.{j}`), then a resampler
    (`downsample` / `upsample`; Identity, no weights, at the end)."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(in_ch if j == 0 else out_ch, out_ch)
                                for j in range(n_blocks))
    setattr(level, resample_name, resample)
    return level

# -----------------------------------------------------------------------------
# 2. Encoder, decoder, autoencoder (LDM's f8 KL autoencoder: ch 128, ch_mult (1, 2, 4, 4), z 4)

class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2 z, H/8, W/8): 2 res blocks per level, /2 between levels, then mid."""
    def __init__(self, ch, ch_mult, z_channels, num_res_blocks=2):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = ch
        for i, mult in enumerate(ch_mult):
            down = Resample(ch * mult, down=True) if i < len(ch_mult) - 1 else nn.Identity()
            self.down.append(resolution_level(c, ch * mult, num_res_blocks, 'downsample', down))
            c = ch * mult
        self.mid = mid_blocks(c)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 2 * z_channels, 3, padding=1)       # double_z

    def forward(self, x):
        h = self.conv_in(x)                                              # (B, ch, H, W)
        for level in self.down:
            for block in level.block:
                h = block(h)
            h = level.downsample(h)                                      # ... (B, 4 ch, H/8, W/8)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))                   # (B, 2 z, H/8, W/8)

class Decoder(nn.Module):
    """(B, z, h, w) -> (B, 3, 8h, 8w): mid, then 3 res blocks per level, x2 between levels.
    up[i] works at the resolution of encoder level i (up[0] is the full resolution); like the
    official code the list is built from the lowest resolution up, each level prepended, so the
    names match."""
    def __init__(self, ch, ch_mult, z_channels, num_res_blocks=3):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = mid_blocks(c)
        self.up = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            up = Resample(ch * ch_mult[i], down=False) if i > 0 else nn.Identity()
            self.up.insert(0, resolution_level(c, ch * ch_mult[i], num_res_blocks, 'upsample', up))
            c = ch * ch_mult[i]
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)                                              # (B, 4 ch, h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):                                  # lowest resolution first
            for block in level.block:
                h = block(h)
            h = level.upsample(h)                                        # ... (B, ch, 8h, 8w)
        return self.conv_out(F.silu(self.norm_out(h)))                   # (B, 3, 8h, 8w)

class AutoencoderKL(nn.Module):
    """The SD-VAE. encode: image in [-1, 1] -> (mean, logvar) of a diagonal Gaussian;
    decode: z -> image. Defaults are sd-vae-ft-mse (83.65M parameters); a smaller `ch`
    (a multiple of 32) is for tests."""
    def __init__(self, ch=128, ch_mult=(1, 2, 4, 4), z_channels=4):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, z_channels)
        self.decoder = Decoder(ch, ch_mult, z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def encode(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)  # each (B, z, H/8, W/8)
        return mean, logvar.clamp(-30.0, 20.0)                           # the official clamp

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))                     # (B, 3, 8h, 8w)

# -----------------------------------------------------------------------------
# 3. The training convention
#    (official ldm/train.py `sample_posterior`, and its decoding for samples).
#    The official pre-encoded ImageNet latents store (mean, std) with std = exp(0.5 * logvar).

def sample_posterior(mean, logvar, noise=None, generator=None):
    """z = mean + exp(0.5 logvar) * noise, noise ~ N(0, I) drawn from `generator` unless given."""
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise

def normalize_latents(z, scale, bias):
    return (z - bias) * scale                                            # VAE latent -> SiT's space

def denormalize_latents(z, scale, bias):
    return z / scale + bias                                              # SiT's space -> vae.decode

# -----------------------------------------------------------------------------
# 4. Loading the official files: local paths, else $TORCH_HOME/hub/checkpoints/, else download once

HF_DIR = 'https://huggingface.co/REPA-E/iREPA-collections/resolve/main/pretrained_models/'
VAE_FILE, STATS_FILE = 'sdvae-ft-mse-f8d4.pt', 'sdvae-ft-mse-f8d4-latents-stats.pt'
# Stable Diffusion's single latent scale, used when no stats file is given.
SD_SCALE = 0.18215

def cached_file(name, timeout=60):
    """The path of `name` in $TORCH_HOME/hub/checkpoints/, downloading it there first if missing."""
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')     # where torch.hub keeps weights
    dst = os.path.join(folder, name)
    if not os.path.isfile(dst):
        old = socket.getdefaulttimeout()
        # With a socket timeout a stalled network fails instead of hanging.
        socket.setdefaulttimeout(timeout)
        try:
            os.makedirs(folder, exist_ok=True)
            # torch.hub downloads into a temporary file first, so no partial file is left at dst.
            torch.hub.download_url_to_file(HF_DIR + name, dst, progress=False)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".replace('\n', ' ')
            raise RuntimeError(f"could not download {HF_DIR + name} ({reason}). Offline? "
                               f"Put {VAE_FILE} and {STATS_FILE} (Hugging Face "
                               f"REPA-E/iREPA-collections, pretrained_models/) in {folder}") from e
        finally:
            socket.setdefaulttimeout(old)
    return dst

def load_vae(path=None, stats_path=None, device='cpu'):
    """Frozen VAE plus per-channel latent scale and bias, each (1, 4, 1, 1) float32 on `device`.
    path None: the official weights and stats (cached or downloaded). A local `path` without
    `stats_path` uses the SD convention (scale 0.18215, bias 0)."""
    with torch.device('meta'):                          # no random init: the weights replace it
        vae = AutoencoderKL()                           # strict load: the official names
    vae.load_state_dict(read(path or cached_file(VAE_FILE)), assign=True)
    vae = vae.float().eval().requires_grad_(False).to(device)
    if stats_path is None and path is not None:
        scale, bias = torch.full((4,), SD_SCALE), torch.zeros(4)
    else:
        scale, bias = read_stats(stats_path)
    scale = scale.float().view(1, -1, 1, 1).to(device)
    bias = bias.float().view(1, -1, 1, 1).to(device)
    return vae, scale, bias

def read_stats(path=None):
    """The per-channel latents_scale and latents_bias, each (4,), of the stats file at `path` (the
    official one stores them as (1, 4, 1, 1)); None: the official file (cached or downloaded)."""
    path = path or cached_file(STATS_FILE)
    stats = read(path)
    if not isinstance(stats, dict) or not {'latents_scale', 'latents_bias'} <= stats.keys():
        raise RuntimeError(f"{path} has no latents_scale and latents_bias: "
                           f"not the VAE's latent statistics")
    scale, bias = (stats[k].float().flatten() for k in ('latents_scale', 'latents_bias'))
    if scale.numel() != 4 or bias.numel() != 4:
        raise RuntimeError(f"{path}: latents_scale and latents_bias must hold 4 values each, one per "
                           f"latent channel")
    return scale, bias

def read(path):
    """torch.load of weights, with one clear error for a file that is not one
    (truncated, a web page, a pickle)."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{path} is not a readable torch file ({type(e).__name__}); "
                           f"if it is a cached download, delete it to fetch it again") from e

# -----------------------------------------------------------------------------
# 5. What training and sampling call: images in [-1, 1] <-> the normalised latents SiT learns

class SDVAE:
    """The latent setting's frozen SD-VAE (iREPA Appendix G): images in [-1, 1] <-> the normalised
    latents SiT is trained on, (latent - bias) * scale with the official per-channel statistics.
    With `stats` (a prepared folder's scale and bias) no weights are loaded: the step samples from
    the stored moments and never runs the encoder."""
    def __init__(self, device, stats=None):
        if stats is None:
            self.vae, self.scale, self.bias = load_vae(device=device)
        else:
            self.vae = None
            self.scale, self.bias = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in stats)

    @torch.no_grad()
    def sample(self, mean, logvar, noise):
        """The normalised posterior sample of moments mean, logvar (B, 4, h, w), with the VAE's
        own noise `noise` like them (not the diffusion noise)."""
        return normalize_latents(sample_posterior(mean, logvar, noise), self.scale, self.bias)

    @torch.no_grad()
    def encode(self, x, noise):
        """x (B, 3, H, W) -> (B, 4, H/8, W/8), in fp32 (TF32 on CUDA), as in DiT's train.py."""
        return self.sample(*self.vae.encode(x), noise)

    @torch.no_grad()
    def decode(self, latent):
        """latent (B, 4, h, w) -> (B, 3, 8h, 8w)."""
        return self.vae.decode(denormalize_latents(latent, self.scale, self.bias))
