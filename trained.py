"""
trained.py -- a trained SiT read back, for sample.py, metrics.py and the experiments: the EMA model of
a checkpoint of irepa.py or of the official iREPA code (End2End-Diffusion/iREPA ldm/train.py), and
the hidden states the alignment loss sees.

    model, args = load_sit('results/demo-SiT-T-4-hog-irepa')   # a run folder: its latest checkpoint
    h, h_proj = noised_features(model, x, y, t=0.5)             # SiT's aligned hidden state
"""
import argparse
import math
import os

import torch

import runs
from irepa import SiT_models, SiT_sizes, autocast, build_model, interpolant

# the official code's encoder names (ldm/vision_encoder.py: <type>-<arch>-<config>) -> irepa.py's;
# the official code's other encoders (SigLIP, CLIP, MoCo v3, ...) are not loadable here
OFFICIAL_ENCODERS = {**{f'dinov2{r}-vit-{s}': f'dinov2_vit{s}14{"_" * bool(r)}{r}' for s in 'sblg'
                        for r in ('', 'reg')},
                     **{f'dinov3-vit-{s}{p}': f'dinov3_vit{s}16' for s in 'sbl' for p in ('', '16')},
                     **{f'dino-vit-{s}': f'dino_vit{s}16' for s in 'sb'}}

def official_checkpoint(ema, ns, model=None):
    """A checkpoint of the official iREPA code (End2End-Diffusion/iREPA ldm/train.py, its REPA and
    iREPA runs: weights 'ema', argparse.Namespace 'args') -> (state dict, args dict) in irepa.py's
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
    """The EMA SiT of a checkpoint, in eval mode, and the checkpoint's args (a dict). Reads irepa.py's
    checkpoints and those of the official iREPA code (its REPA and iREPA runs), unpickling
    nothing but tensors, plain types and argparse.Namespace. `path` may be a run folder (its latest
    checkpoint). Raises ValueError with a one-line reason for a missing, truncated or
    foreign file."""
    # A run folder: its latest checkpoint.
    if os.path.isdir(path):
        folder, path = path, runs.latest_checkpoint(path)
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
    own = isinstance(ckpt, dict) and isinstance(ckpt.get('args'), dict)         # irepa.py's
    if own and model not in (None, ckpt['args'].get('model')):
        raise ValueError(f"--model {model}: {path} is irepa.py's {ckpt['args'].get('model')} "
                         f"(--model is for official checkpoints, which do not record it)")
    try:
        ema, args = ckpt['ema'], ckpt['args']
        if isinstance(args, argparse.Namespace):
            ema, args = official_checkpoint(ema, args, model)
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
    # The VAE's noise is shaped like SiT's input.
    if sd_vae is not None:
        x = sd_vae.encode(x, torch.randn((len(x), model.in_channels, model.input_size, model.input_size),
                                          device=x.device, generator=generator))
    t = torch.full((len(x),), float(t), device=x.device)
    x_t, _ = interpolant(x, torch.randn(x.shape, device=x.device, generator=generator), t)
    with autocast(x.device):
        h, h_proj = hidden_state(model, x_t, t, y)
    return h.float(), None if h_proj is None else h_proj.float()
