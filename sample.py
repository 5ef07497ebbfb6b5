"""
Sample images from an irepa.py checkpoint: REPA's Euler-Maruyama SDE sampler (its FID setting) or
the Euler / Heun ODE, with classifier-free guidance (CFG) and REPA's guidance interval; MeanFlow
checkpoints in 1 or k steps. The checkpoint is all it needs: the SiT is rebuilt from the
checkpoint's args and the EMA weights are used.

One process (CPU or one GPU), a labelled grid of a few classes:
    python sample.py --ckpt results/latent-SiT-XL-2-dinov2_vitb14-irepa \
        --class-labels 207 360 --num-samples 16
50K samples for FID on 8 GPUs, then ADM's evaluator (rank r samples its share with
seed = seed * world + r; rank 0 writes the npz):
    torchrun --nproc_per_node=8 sample.py --ckpt .../0400000.pt --num-samples 50000 \
        --batch-size 125 --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7
    python guided-diffusion/evaluations/evaluator.py \
        VIRTUAL_imagenet256_labeled.npz samples/samples.npz
Writes <out>/grid.png (the first 64 samples, for people) and <out>/samples.npz
(arr_0: uint8 (N, H, W, 3)).

Time convention, as in irepa.py: t = 0 is data, t = 1 is noise,
    x_t = (1 - t) x + t noise,    v = noise - x.
Sampling integrates from t = 1 (noise) down to t = 0 (data), so every dt below is negative.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

import irepa
import runs
import trained
import vae

# -----------------------------------------------------------------------------
# CFG: batch [cond; null], null label = model.num_classes (the label table's extra row, SiT / DiT).
# guided = null + s * (cond - null), only for guidance_low <= t <= guidance_high (REPA's guidance
# interval); outside it, or with s = 1, only the conditional half runs.

def velocity(model, x, t, y, dtype, cfg_scale, guidance_low, guidance_high, t_guide=None):
    """The (guided) velocity at float64 state x (B, C, H, W) and time t (a float); the model runs
    in `dtype` (under bf16 autocast where irepa.autocast chooses it). Whether to guide is decided
    at t_guide (default t): REPA's Heun step decides its correction with the step's start time
    t_cur."""
    t_guide = t if t_guide is None else t_guide
    guide = cfg_scale > 1.0 and guidance_low <= t_guide <= guidance_high
    if guide:
        x = torch.cat([x, x])                                                    # (2B, C, H, W)
        y = torch.cat([y, torch.full_like(y, model.num_classes)])                # (2B,)
    t = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)       # (B,) or (2B,)
    with irepa.autocast(x.device):
        out = model(x.to(dtype), t.to(dtype), y)[0].to(torch.float64)
    v = irepa.to_velocity(out, x, t, getattr(model, 'pred', 'v'))                # x-prediction -> v
    if guide:
        v_cond, v_null = v.chunk(2)
        v = v_null + cfg_scale * (v_cond - v_null)
    return v

# -----------------------------------------------------------------------------
# Samplers (REPA's samplers.py, SiT's Euler-Maruyama).
# The state is float64; the model sees the input's dtype.

@torch.no_grad()
def euler_sampler(model, x, y, num_steps=50, heun=False, cfg_scale=1.0, guidance_low=0.0,
                  guidance_high=1.0):
    """Probability-flow ODE dx = v dt, Euler on linspace(1, 0, N + 1); Heun's correction on all but
    the last step (it would evaluate the model at t = 0). NFE = N (Euler) or 2N - 1 (Heun)."""
    dtype = x.dtype
    x = x.to(torch.float64)
    def v(x, t, t_guide):
        return velocity(model, x, t, y, dtype, cfg_scale, guidance_low, guidance_high, t_guide)
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        dt = t_next - t_cur
        d_cur = v(x, t_cur, t_cur)
        x_next = x + dt * d_cur
        if heun and i < num_steps - 1:
            # The correction is guided exactly when the step's start is (REPA's samplers.py).
            x_next = x + dt * 0.5 * (d_cur + v(x_next, t_next, t_cur))
        x = x_next
    return x

@torch.no_grad()
def euler_maruyama_sampler(model, x, y, num_steps=250, cfg_scale=1.0, guidance_low=0.0,
                           guidance_high=1.0):
    """Reverse SDE dx = (v - w/2 * score) dt + sqrt(w) dW with w = 2t (REPA's choice),
    Euler-Maruyama on linspace(1, 0.04, N), then one noise-free step 0.04 -> 0 (the mean of the
    last step). NFE = N. REPA guides the drift; the drift is affine in v with the same x in both
    halves, so guiding v is the same."""
    dtype = x.dtype
    x = x.to(torch.float64)
    t_steps = torch.linspace(1, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        dt = t_next - t_cur
        w = 2 * t_cur
        v = velocity(model, x, t_cur, y, dtype, cfg_scale, guidance_low, guidance_high)
        # x_t = noise - (1 - t) v, so the score -E[noise | x_t] / t is -(x_t + (1 - t) v) / t.
        score = (-(1 - t_cur) * v - x) / t_cur
        drift = v - 0.5 * w * score
        x = x + drift * dt
        if t_next > 0:
            x = x + math.sqrt(w) * math.sqrt(-dt) * torch.randn_like(x)
    return x

@torch.no_grad()
def meanflow_sampler(model, x, y, num_steps=1):
    """MeanFlow (meanflow.py): x <- x - (t_i - t_i+1) u(x, t_i, y, interval = t_i - t_i+1)
    on the uniform grid linspace(1, 0, k + 1); one step is x_0 = x_1 - u(x_1, 1, y, 1). NFE = k.
    Guidance was trained in: no CFG."""
    dtype = x.dtype
    x = x.to(torch.float64)
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        t = torch.full((x.shape[0],), t_cur, dtype=dtype, device=x.device)
        with irepa.autocast(x.device):
            u = model(x.to(dtype), t, y, t - t_next)[0].to(torch.float64)
        x = x - (t_cur - t_next) * u
    return x

# -----------------------------------------------------------------------------
# Batched sampling to uint8 images, a picture for people,
# and every rank's samples gathered on rank 0

@torch.no_grad()
def sample(model, labels, mode='sde', num_steps=250, heun=False, cfg_scale=1.0, guidance_low=0.0,
           guidance_high=1.0, seed=0, batch_size=64, verbose=False, sd_vae=None):
    """Sample one image per label. Returns uint8 (N, H, W, 3). Deterministic given the seed and
    batch_size; the caller's RNG state is left untouched (safe to call from a training loop).
    A latent-space model's samples are decoded by `sd_vae` (vae.SDVAE: the SD-VAE) into 8x larger
    images."""
    device = next(model.parameters()).device
    C, S = model.in_channels, model.input_size
    labels = torch.as_tensor(labels, dtype=torch.long)
    images = []
    t0 = time.time()
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        for y in labels.split(batch_size):
            y = y.to(device)                                                # (B,)
            x = torch.randn(len(y), C, S, S, device=device)                 # (B, C, S, S)
            if mode == 'sde':
                x = euler_maruyama_sampler(model, x, y, num_steps, cfg_scale, guidance_low,
                                           guidance_high)
            elif mode == 'meanflow':
                x = meanflow_sampler(model, x, y, num_steps)
            else:
                x = euler_sampler(model, x, y, num_steps, heun, cfg_scale, guidance_low,
                                  guidance_high)
            if sd_vae is not None:
                x = sd_vae.decode(x.float())                                # (B, 3, 8S, 8S)
            x = ((x + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)     # [-1, 1] -> 0..255
            images.append(x.permute(0, 2, 3, 1).cpu())                      # (B, H, W, 3)
            if verbose:
                n = sum(len(b) for b in images)
                dt = time.time() - t0
                print(f"sampled {n}/{len(labels)} | {dt:.0f} s | {n / dt:.1f} img/s", flush=True)
    S, C = (8 * S, 3) if sd_vae is not None else (S, C)
    return torch.cat(images).numpy() if images else np.zeros((0, S, S, C), np.uint8)

def save_grid(images, path, labels=None, class_names=None, nrow=None):
    """Save uint8 (N, H, W, 3) as one PNG grid; small images are enlarged (nearest) so people can
    see them, and with labels each tile gets its class name above it."""
    N, H, W, _ = images.shape
    nrow = nrow or math.ceil(math.sqrt(N))
    zoom = max(1, 128 // H)
    h, w = H * zoom, W * zoom                                       # one tile
    top = 12 if labels is not None else 0                           # the name strip above a tile
    pad = 2                                                         # between tiles
    size = (nrow * (w + pad) + pad, math.ceil(N / nrow) * (h + top + pad) + pad)
    grid = Image.new('RGB', size, 'white')
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, img in enumerate(images):
        left, upper = pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + top + pad)
        grid.paste(Image.fromarray(img).resize((w, h), Image.NEAREST), (left, upper + top))
        if labels is not None:
            name = class_names[labels[i]] if class_names else str(labels[i])
            draw.text((left, upper), name[: max(1, w // 6)], fill='black', font=font)
    grid.save(path)

def gather_to_rank0(images, rank, world, chunk=1024):
    """Each rank's uint8 images (N_r, H, W, 3) -> on rank 0 all of them in rank order
    (others: None), sent through torch.distributed in chunks of `chunk` images per rank, so nodes
    need no shared disk and memory stays bounded."""
    sizes = [None] * world
    dist.all_gather_object(sizes, len(images))
    pieces = [[] for _ in range(world)]
    for start in range(0, max(sizes), chunk):
        got = [None] * world if rank == 0 else None
        dist.gather_object(images[start:start + chunk], got, dst=0)
        if rank == 0:
            for r in range(world):
                pieces[r].append(got[r])
    return np.concatenate([p for r in range(world) for p in pieces[r]]) if rank == 0 else None

# -----------------------------------------------------------------------------
# Command line. Sampler defaults come from the checkpoint's recipe (latent: REPA's SDE 250 steps;
# pixel: JiT's Heun 50; demo: Heun 25 with CFG 4; MeanFlow: 1 step); every flag overrides them.

def get_args(argv=None):
    p = argparse.ArgumentParser(
        description="Sample from an irepa.py checkpoint (defaults: its recipe's sampler).")
    p.add_argument("--ckpt", type=str, required=True,
                   help="checkpoint written by irepa.py, or a run folder (latest)")
    p.add_argument("--model", default=None, choices=list(irepa.SiT_models),
                   help="the SiT size of an official checkpoint (default: read off its weights)")
    p.add_argument("--mode", type=str, choices=["sde", "ode", "meanflow"], default=None,
                   help="default: the recipe's "
                        "(meanflow: a MeanFlow checkpoint's 1- or k-step sampler)")
    p.add_argument("--num-steps", type=int, default=None,
                   help="SDE: NFE (REPA's FID: 250); ODE: steps; meanflow: NFE")
    p.add_argument("--heun", action=argparse.BooleanOptionalAction, default=None,
                   help="ode mode: Heun's second-order correction")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="1 = no guidance; REPA's best: 1.8")
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0, help="REPA's best with CFG: 0.7")
    p.add_argument("--num-samples", type=int, default=None,
                   help="default: one per --class-labels; "
                        "else 8 per class up to 16 classes, else 64")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help="cycled to --num-samples, a grid column each; "
                        "default: every class when the checkpoint has <= 16 "
                        "and --num-samples is not given, else uniform random labels")
    p.add_argument("--out", type=str, default="samples",
                   help="directory for grid.png and samples.npz")
    return p.parse_args(argv)

def main(argv=None):
    args = get_args(argv)
    # Each flag's least value; --cfg-scale 1 is no guidance.
    runs.check_ranges(args, dict(num_steps=1, batch_size=1, num_samples=1, cfg_scale=1, seed=0))
    if not 0 <= args.guidance_low <= args.guidance_high <= 1:
        runs.fail(f"--guidance-low must be <= --guidance-high, both in [0, 1], "
                   f"got {args.guidance_low}, {args.guidance_high}")
    if problem := runs.output_dir_problem(args.out):
        runs.fail(f"--out {problem}")

    # one process, or one per GPU (CPU: gloo) under torchrun; float64 state rules out MPS
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    else:
        rank, world = 0, 1
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    model, ckpt_args = runs.call_or_fail(trained.load_sit, args.ckpt, device, args.model)
    # A latent-space checkpoint's samples are decoded with the VAE, downloaded once a node.
    sd_vae = None
    with runs.node_first(world):
        if ckpt_args.get("vae"):
            sd_vae = runs.call_or_fail(vae.SDVAE, device)
    K, class_names = model.num_classes, ckpt_args.get("class_names")
    recipe = {**dict(mode="sde", num_steps=250, heun=False, cfg_scale=1.0),
              **(ckpt_args.get("sampler") or {})}
    args.mode = args.mode or recipe["mode"]
    if args.mode != recipe["mode"]:
        # Another mode than the recipe's gets its own steps and no Heun; the CFG stays the same.
        recipe.update(num_steps={"sde": 250, "ode": 50, "meanflow": 1}[args.mode], heun=False)
    for k in ("num_steps", "heun", "cfg_scale"):
        if getattr(args, k) is None:
            setattr(args, k, recipe[k])
    if args.mode != "ode" and args.heun:
        runs.fail("--heun is for --mode ode")
    # The other way round is fine: at interval 0 a MeanFlow SiT is a velocity, so ode/sde work.
    if args.mode == "meanflow" and ckpt_args.get("objective") != "meanflow":
        runs.fail("--mode meanflow needs a checkpoint trained with --objective meanflow")
    if args.mode == "meanflow" and args.cfg_scale != 1:
        runs.fail("MeanFlow trains its guidance in (the recipe's omega, kappa): "
                   "--cfg-scale must be 1")
    sampler = dict(mode=args.mode, num_steps=args.num_steps, cfg_scale=args.cfg_scale, heun=args.heun)
    if problem := runs.sampler_problem(sampler, ckpt_args.get("objective", "fm")):
        runs.fail(f"the sampler {sampler} (the checkpoint's recipe, then the flags given): {problem}")

    # labels for all N samples, the same on every rank; each rank samples a contiguous share
    if args.class_labels is not None:
        bad = [c for c in args.class_labels if not 0 <= c < K]
        if bad:
            runs.fail(f"class labels {bad} out of range: this checkpoint has classes 0..{K - 1}")
    if args.num_samples:
        N = args.num_samples
    elif args.class_labels:
        N = len(args.class_labels)
    else:
        N = 8 * K if K <= 16 else 64
    if args.class_labels is None and args.num_samples is None and K <= 16:
        args.class_labels = list(range(K))      # few classes: 8 of each, a labelled column each
    if args.class_labels:
        labels = np.resize(np.array(args.class_labels), N)
    else:
        labels = torch.randint(K, (N,), generator=torch.Generator().manual_seed(args.seed)).numpy()
    share = np.array_split(np.arange(N), world)[rank]
    if rank == 0:
        print(f"sampling {N} images with {world} process(es) on {device}: "
              f"{args.mode}{' heun' if args.heun else ''}, {args.num_steps} steps, "
              f"cfg {args.cfg_scale} on t in [{args.guidance_low}, {args.guidance_high}]",
              flush=True)
    images = sample(model, labels[share], args.mode, args.num_steps, args.heun, args.cfg_scale,
                    args.guidance_low, args.guidance_high, seed=args.seed * world + rank,
                    batch_size=args.batch_size, verbose=rank == 0, sd_vae=sd_vae)

    # rank 0 gathers the shares through torch.distributed (no shared disk needed)
    # and writes one samples.npz
    if world > 1:
        images = gather_to_rank0(images, rank, world)
    if rank == 0:
        np.savez(os.path.join(args.out, "samples.npz"), arr_0=images)
        n = min(N, 64)
        save_grid(images[:n], os.path.join(args.out, "grid.png"),
                  labels[:n] if args.class_labels else None, class_names,
                  nrow=len(args.class_labels) if args.class_labels else None)
        print(f"wrote {args.out}/samples.npz {images.shape} {images.dtype} "
              f"and {args.out}/grid.png", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return args.out

if __name__ == "__main__":
    main()
