"""
bench.py -- time irepa.py's training step (data on device -> target -> forward + backward -> clip ->
AdamW -> EMA) in fp32 and in bf16 autocast, interleaved in one run, and print the medians and the
speed-up; first the step's FLOPs per image, part by part, against the official code's step at the
same config (which trains from stored SD-VAE moments); or the data loader's images/s per worker;
or the conversion of the authors' released ImageNet (prepare.py --hf-*), images/s per process.

    # SiT-B/4 + iREPA (HOG) at 32 px, batch 32
    python bench.py
    python bench.py --model SiT-S/4 --batch-size 64
    # MeanFlow's step (guidance passes, jvp) instead
    python bench.py --objective meanflow
    # GPU, the latent setting: the SD-VAE encodes every batch (raw folder) or not (--prepared:
    # stored moments)
    python bench.py --model SiT-XL/2 --image-size 256 --vae --encoder dinov2_vitb14 \
        --batch-size 32 --compile
    python bench.py --model SiT-XL/2 --image-size 256 --vae --prepared --encoder dinov2_vitb14 \
        --batch-size 32
    # images/s of one loader process, each folder
    python bench.py --loader imagenet/train prepared/in256
    # images/s of prepare.py --hf-images/--hf-latents (hfcache.py) on a synthetic cache of 3000 rows
    TMPDIR=/dev/shm python bench.py --hf-convert 3000 --image-size 256 --num-workers 2
With --vae the VAE's share of the step is printed on its own (random VAE weights). On CUDA: peak
memory and the model FLOPs utilisation (MFU) against bf16 peak.
"""
import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext

import torch

import irepa
import data
import meanflow

def forward_flops(model, T):
    """Model FLOPs of one image's forward pass through a SiT with T tokens (2 per multiply-add).
    Every weight is used once per token, except those of the adaLN, timestep and (MeanFlow) interval
    MLPs, which act once per image on c; attention adds q @ k^T and att @ v, 2 x T x T x D
    multiply-adds per block. (DiT-XL/2: 2 x 118.6 GFLOPs.)"""
    blocks = [*model.blocks, model.final_layer]
    per_image = {id(m) for b in blocks for m in b.adaLN_modulation.modules()}
    # MeanFlowSiT also has the interval's embedder.
    embedders = (model.t_embedder, getattr(model, 'interval_embedder', None))
    per_image |= {id(m) for e in embedders if e is not None for m in e.modules()}
    flops = 4 * len(model.blocks) * T * T * model.pos_embed.shape[-1]
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            flops += 2 * m.weight.numel() * (1 if id(m) in per_image else T)
    return flops

def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('--model', default='SiT-B/4', choices=list(irepa.SiT_models))
    p.add_argument('--image-size', type=int, default=32)
    p.add_argument('--encoder', default='hog', choices=list(irepa.ENCODERS) + ['none'])
    p.add_argument('--hub-dir', default=None)
    p.add_argument('--vae', action='store_true',
                   help="latent setting: SD-VAE encode in the step (random weights)")
    p.add_argument('--prepared', action='store_true',
                   help="with --vae: sample stored moments (prepare.py), no VAE")
    p.add_argument('--loader', nargs='+', default=None, metavar='DIR',
                   help="time the data loader instead: class folders or prepared folders, "
                        "at --image-size")
    p.add_argument('--loader-images', type=int, default=500,
                   help="images read per folder by --loader")
    p.add_argument('--hf-convert', type=int, default=None, metavar='ROWS',
                   help="time converting the authors' Hugging Face caches instead: a synthetic "
                        "cache of ROWS rows at --image-size, in 1 and --num-workers processes")
    p.add_argument('--num-workers', type=int, default=2, help="processes timed by --hf-convert")
    p.add_argument('--flops-only', action='store_true',
                   help="print the step's FLOPs per image and stop (no timing)")
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--repeats', type=int, default=5, help="timed steps per precision, interleaved")
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--compile', action='store_true')
    p.add_argument('--objective', default='fm', choices=['fm', 'meanflow'],
                   help="the loss timed (irepa.py's)")
    p.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16'])
    p.add_argument('--peak-tflops', type=float, default=989.0,
                   help="bf16 dense peak of the GPU (H100 SXM: 989)")
    args = p.parse_args(argv)
    if args.loader:
        return loader_bench(args)
    if args.hf_convert:
        return hf_convert_bench(args)

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = irepa.SiT_models[args.model].keywords
    down = 8 if args.vae else 1
    grid = args.image_size // down // cfg['patch_size']
    enc = None
    if args.encoder != 'none':
        enc = irepa.load_encoder(args.encoder, grid, args.hub_dir, device)
    vae = None
    if args.vae:
        import vae as sdvae
        vae = sdvae.AutoencoderKL().to(device).eval().requires_grad_(False)
    mean_flow = args.objective == 'meanflow'
    kw = dict(cfg, input_size=args.image_size // down, in_channels=4 if args.vae else 3,
              num_classes=1000, projector='conv', target_dim=enc.embed_dim if enc else None)
    sit = meanflow.MeanFlowSiT if mean_flow else irepa.SiT
    if args.flops_only:
        with torch.device('meta'):                                          # shapes only, no memory
            return step_flops(args, sit(**kw), enc, grid)
    model = sit(**kw).to(device)
    ema = sit(**kw).to(device).requires_grad_(False)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4,
                            weight_decay=0, fused=device.type == 'cuda')
    fwd = torch.compile(model) if args.compile else model
    B = args.batch_size
    img = torch.randint(0, 256, (B, 3, args.image_size, args.image_size), device=device,
                        dtype=torch.uint8)
    y = torch.randint(0, 1000, (B,), device=device)
    S = args.image_size // down
    moments = torch.cat([torch.randn(B, 4, S, S, device=device),
                         torch.full((B, 4, S, S), -4.0, device=device)], 1)
    step_flops(args, model, enc, grid)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    # The loss, picked as irepa.train picks it.
    if mean_flow:
        loss_fn = meanflow.objective(argparse.Namespace(**meanflow.RECIPE), model)[0]
    else:
        loss_fn = irepa.flow_matching_loss

    def step(bf16):
        """One training step as irepa.train runs it; returns the seconds spent in the VAE."""
        mixed_precision = nullcontext()
        if bf16:
            mixed_precision = torch.autocast(device.type, dtype=torch.bfloat16)
        x = img.float() / 127.5 - 1
        t_vae = 0.0
        if args.prepared:
            # Stored moments: no VAE runs.
            mean, logvar = moments.chunk(2, dim=1)
            x = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * 0.18215
        elif vae is not None:                                               # fp32, as in training
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                mean, logvar = vae.encode(x)
                x = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * 0.18215
            sync()
            t_vae = time.perf_counter() - t0
        target = None
        if enc is not None:
            with torch.no_grad(), mixed_precision:
                target = irepa.spatial_norm(enc(img.float()).float())
        t = torch.rand(B, device=device)
        if mean_flow:                                                        # (B, 2): t and r <= t
            t = torch.stack([t, t * torch.rand(B, device=device)], dim=1)
        with mixed_precision:
            denoise, align = loss_fn(fwd, x, y, torch.randn_like(x), t, target)
            loss = denoise + 0.5 * align
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1e-4)
        return t_vae

    times, vae_times = {p: [] for p in args.precisions}, {p: [] for p in args.precisions}
    for i in range(args.warmup + args.repeats):
        # Interleaved: drift hits both precisions alike.
        for prec in args.precisions:
            sync()
            t0 = time.perf_counter()
            tv = step(prec == 'bf16')
            sync()
            if i >= args.warmup:
                times[prec].append(time.perf_counter() - t0)
                vae_times[prec].append(tv)
    if device.type == 'cuda':
        peak_mem = torch.cuda.max_memory_allocated() / 2 ** 30

    fwd_flops = forward_flops(model, grid * grid)                               # per image
    # Forward + backward = 3 x forward.
    flops = 3 * fwd_flops * B
    latent = ' latent' if args.vae else ''
    header = (f"{args.model} {args.image_size}px{latent} {args.encoder} iREPA {args.objective} | "
              f"batch {B} | "
              f"{fwd_flops / 1e9:.2f} GFLOPs/img fwd | {device.type} "
              f"({torch.get_num_threads()} threads) | median of {args.repeats}")
    if device.type == 'cuda' and 'fp32' in args.precisions:
        header += " | fp32 means TF32 matmuls (as irepa.py)"
    if device.type == 'cuda' and not mean_flow:
        header += " | MFU counts SiT's FLOPs only"
    print(header)
    for prec in args.precisions:
        dt = statistics.median(times[prec])
        line = f"  {prec}: {dt * 1000:8.1f} ms/step | {B / dt:7.1f} img/s"
        if vae is not None:
            vae_dt = statistics.median(vae_times[prec])
            line += f" | VAE encode {vae_dt * 1000:.1f} ms ({vae_dt / dt:.0%})"
        # No MFU for MeanFlow: its FLOPs are not 3 x forward.
        if device.type == 'cuda' and not mean_flow:
            line += f" | MFU {flops / dt / (args.peak_tflops * 1e12) * 100:.1f}%"
        print(line)
    if len(args.precisions) == 2:
        speedup = statistics.median(times['fp32']) / statistics.median(times['bf16'])
        print(f"  bf16 speed-up: {speedup:.2f}x")
    if device.type == 'cuda':
        print(f"  peak memory {peak_mem:.2f} GiB")

def counted_flops(fn, *inputs):
    """FLOPs of fn(*inputs) as torch's FlopCounterMode counts them (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*inputs)
    return counter.get_total_flops()

def step_flops(args, model, enc, grid):
    """The step's FLOPs per image, part by part, and the ratio to the official code's step at the
    same config (ldm/train.py trains from stored SD-VAE moments: SiT and the target, no VAE)."""
    # Forward + backward = 3 x forward.
    sit = 3 * forward_flops(model, grid * grid)
    target = 0
    if enc is not None:
        # Counted on one image.
        enc_device = next(iter(enc.buffers()), torch.zeros(1)).device
        target = counted_flops(enc, torch.zeros(1, 3, args.image_size, args.image_size,
                                                device=enc_device))
    vae_flops = 0
    if args.vae and not args.prepared:
        import vae as sdvae
        # Shapes only, no memory.
        with torch.device('meta'):
            vae = sdvae.AutoencoderKL()
            image = torch.zeros(1, 3, args.image_size, args.image_size)
            vae_flops = counted_flops(vae.encode, image)
    official = sit + target
    ours = official + vae_flops
    parts = f"SiT fwd+bwd {sit / 1e9:.1f} | target {target / 1e9:.1f}" + (
        f" | SD-VAE encode {vae_flops / 1e9:.1f}" if args.vae and not args.prepared else
        " | SD-VAE 0 (stored moments)" if args.prepared else "")
    print(f"GFLOPs per image: {parts} | step {ours / 1e9:.1f} | "
          f"official step {official / 1e9:.1f} | ratio {ours / official:.2f}x")

def loader_bench(args):
    """Images/s of one process reading random items (what each DataLoader worker delivers): class
    folders (decode + ADM's crop) or prepared folders (memory-mapped arrays)."""
    import numpy as np
    for root in args.loader:
        prepared = os.path.isfile(os.path.join(root, 'manifest.json'))
        if prepared:
            vae = json.load(open(os.path.join(root, 'manifest.json')))['vae']
            ds = data.PreparedFolder(root, args.image_size, vae)
        else:
            ds = data.ImageFolder(root, args.image_size)
        idx = np.random.default_rng(0).permutation(len(ds))[:args.loader_images]
        # Opened once, as a worker does.
        ds[int(idx[0])]
        t0 = time.perf_counter()
        for i in idx:
            ds[int(i)]
        dt = time.perf_counter() - t0
        if prepared:
            kind = 'prepared (uint8 arrays' + (', + moments)' if vae else ')')
        else:
            kind = 'class folders (decode + ADM crop)'
        print(f"{root}: {kind} at {args.image_size} px | {len(idx) / dt:.0f} images/s per loader "
              f"process ({len(idx)} random images, {torch.get_num_threads()} threads)")

def hf_convert_bench(args):
    """Images/s of prepare.py --hf-images/--hf-latents's conversion (hfcache.py: PNG decoding is
    most of it) on a synthetic cache in the official layout, 4 shards each: smooth crops as PNGs
    uncompressed (compress_level=0, as the official dataset_tools.py writes them), [8, S/8, S/8]
    float32 (mean, std) latents. The cache is read from the page cache; the shards written are
    fsynced, so on a slow disk the workers wait for it (TMPDIR=/dev/shm times the CPU alone)."""
    import io, platform, tempfile
    import numpy as np
    from PIL import Image
    import hfcache
    pa = hfcache.import_pyarrow()
    N, S, rng = args.hf_convert, args.image_size, np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        images, latents, pngs = os.path.join(tmp, 'images'), os.path.join(tmp, 'latents'), []
        for _ in range(N):                      # bicubic-upsampled 8x8 noise: smooth, photo-like
            im = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            buf = io.BytesIO()
            im.resize((S, S), Image.BICUBIC).save(buf, format='PNG', compress_level=0)
            pngs.append(buf.getvalue())
        image = pa.array([{'bytes': b, 'path': None} for b in pngs],
                         pa.struct([('bytes', pa.binary()), ('path', pa.string())]))
        labels = pa.array(np.arange(N) * 10 // N)                          # 10 classes, sorted
        hfcache.save_to_disk(images, pa.table({'image': image, 'label': labels}),
                             {'image': {'_type': 'Image'}}, shards=4)
        h = S // 8
        moments = np.concatenate([rng.normal(0, 1, (N, 4, h, h)),          # mean, std > 0
                                  np.exp(rng.uniform(-6, -2, (N, 4, h, h)))], 1).astype(np.float32)
        hfcache.save_to_disk(latents, pa.table(
            {'id': pa.array(np.arange(N)), 'data': hfcache.nested(moments)}), {}, shards=4)
        source = hfcache.OfficialImageNet(S, images, latents)
        cpu = platform.processor()
        if os.path.isfile('/proc/cpuinfo'):
            cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
                        if line.startswith('model name')), cpu)
        kb = sum(map(len, pngs)) / N / 1e3
        print(f"hf-convert: {N} rows of {S} px (PNG {kb:.1f} KB a row) | "
              f"host: {cpu}, {os.cpu_count()} CPUs, {platform.platform()} | in {tmp}")
        # 12 shards: an even share for 1, 2, 3, 4 or 6 processes
        shard_size = -(-N // 12)
        shards = range(-(-N // shard_size))
        for workers in sorted({0, args.num_workers}):
            out = tempfile.mkdtemp(dir=tmp)
            t0 = time.perf_counter()
            for _ in hfcache.write_shards(source, out, shards, shard_size, workers):
                pass
            rate = N / (time.perf_counter() - t0)
            per_process = rate / max(workers, 1)
            print(f"  {workers} workers: {rate:.0f} images/s ({per_process:.0f} per process) | "
                  f"ImageNet (1,281,167 rows): {1_281_167 / per_process / 60:.0f} core-minutes")

if __name__ == '__main__':
    main()
