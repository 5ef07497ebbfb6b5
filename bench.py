"""
bench.py -- time irepa.py's training step: forward + backward + AdamW + EMA, after warm-up.

    python bench.py                                              # SiT-B/2 + iREPA (HOG) at 32 px, on cuda/mps/cpu
    python bench.py --model SiT-XL/16 --image-size 256 --encoder dinov2_vitb14 --batch-size 32 --compile
Prints ms/step, img/s, peak memory and, on CUDA, the model FLOPs utilisation (MFU) against bf16 peak.
"""
import argparse
import time

import torch

import irepa

p = argparse.ArgumentParser()
p.add_argument('--model', default='SiT-B/2', choices=list(irepa.SiT_models))
p.add_argument('--image-size', type=int, default=32)
p.add_argument('--encoder', default='hog', choices=list(irepa.ENCODERS) + ['none'])
p.add_argument('--hub-dir', default=None)
p.add_argument('--batch-size', type=int, default=32)
p.add_argument('--steps', type=int, default=10)
p.add_argument('--warmup', type=int, default=3)
p.add_argument('--compile', action='store_true')
p.add_argument('--peak-tflops', type=float, default=989.0, help="bf16 dense peak of the GPU (H100 SXM: 989)")
args = p.parse_args()

device = torch.device('cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu')
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
cfg = irepa.SiT_models[args.model].keywords
grid = args.image_size // cfg['patch_size']
enc = None if args.encoder == 'none' else irepa.load_encoder(args.encoder, grid, args.hub_dir, device)
model = irepa.SiT_models[args.model](input_size=args.image_size, num_classes=1000, projector='conv',
                                     z_dim=enc.embed_dim if enc else None).to(device)
ema = irepa.SiT_models[args.model](input_size=args.image_size, num_classes=1000, projector='conv',
                                   z_dim=enc.embed_dim if enc else None).to(device).requires_grad_(False)
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, weight_decay=0,
                        fused=device.type == 'cuda')
fwd = torch.compile(model) if args.compile else model
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')
B = args.batch_size
img = torch.randint(0, 256, (B, 3, args.image_size, args.image_size), device=device, dtype=torch.uint8)
y = torch.randint(0, 1000, (B,), device=device)

def step():
    x = img.float() / 127.5 - 1
    z = None
    if enc is not None:
        with torch.no_grad(), autocast:
            z = irepa.spatial_norm(enc(img.float()).float())
    with autocast:
        d, a = irepa.flow_matching_loss(fwd, x, y, torch.randn_like(x), torch.rand(B, device=device), z)
        loss = d + 0.5 * a if a is not None else d
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1e-4)

sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
for _ in range(args.warmup):
    step()
sync()
if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
for _ in range(args.steps):
    step()
sync()
dt = (time.perf_counter() - t0) / args.steps

# model FLOPs per image for training: 3 x forward; forward = 2 x matmul params x tokens + attention 4 x depth x T^2 x D
T, D, depth = grid * grid, cfg['hidden_size'], cfg['depth']
matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
flops = 3 * (2 * matmul_params * T + 4 * depth * T * T * D) * B
line = (f"{args.model} {args.image_size}px {args.encoder} iREPA | batch {B} | {device.type} | {dt * 1000:.1f} ms/step | "
        f"{B / dt:.1f} img/s")
if device.type == 'cuda':
    line += (f" | peak mem {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB | "
             f"MFU {flops / dt / (args.peak_tflops * 1e12) * 100:.1f}%")
print(line)
