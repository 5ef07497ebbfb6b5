"""
experiments/cifar10.py -- vanilla SiT vs REPA vs iREPA on CIFAR-10 (32 px), with a weight-free HOG target and a
pretrained ResNet-20 target, scored by a Frechet distance (FD) on the features of a CIFAR-10 ResNet-56.

The FD is FID (Heusel et al. 2017, arXiv 1706.08500) with the Inception network swapped for a ResNet-56 trained
on CIFAR-10 (experiments/hubconf.py, akamaster/pytorch_resnet_cifar10 weights): a small, CPU-fast network that
sees 32 px images at their native size. The reference is 10,000 train images (a fixed, seeded subset).

Data: CIFAR-10 as class folders of JPEGs, ROOT/{train,test}/<class>/*.jpg:
    mkdir -p /tmp/cifar && tar -xzf ../shared/data/cifar10.tar.gz -C /tmp/cifar     # ROOT = /tmp/cifar/cifar10_jpg

    python experiments/cifar10.py check --data-path ROOT            # ResNet-56/-20 test accuracy, FD noise floor
    python experiments/cifar10.py fd samples.npz --data-path ROOT   # FD of sample.py's npz; the last line is the FD

The reference statistics are computed once and cached in --out-dir (default experiments/cifar10/ref_stats.npz).
"""
import argparse
import hashlib
import os
import sys
import time

import numpy as np
import scipy.linalg
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]                                    # irepa.py (repo root), hubconf.py
import hubconf  # noqa: E402
import irepa    # noqa: E402

REF_SIZE = 10_000       # train images in the FD reference
HELD_OUT = 2_000        # further train images (not in the reference): the real-data FD, i.e. the noise floor
SEED = 0                # fixes both subsets
BATCH = 100             # the fastest on a 2-core CPU (100: ~790 img/s, 500: ~580)

# -----------------------------------------------------------------------------
# 1. ResNet-56 features and the Frechet distance between the Gaussians fitted to them

# akamaster's trainer.py trained the CIFAR ResNets on ToTensor() then Normalize with the ImageNet mean/std
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

def normalise(images):
    """uint8 (B, 3, 32, 32) -> float32, /255, ImageNet mean/std: the input of hubconf.py's ResNets."""
    return (images.float() / 255 - MEAN) / STD

@torch.inference_mode()
def run_batched(fn, images, batch_size=BATCH):
    """fn over uint8 (N, 3, 32, 32) in batches, in float32; returns the concatenated float32 outputs."""
    return torch.cat([fn(normalise(images[i:i + batch_size])).float() for i in range(0, len(images), batch_size)])

def fd_features(net, images):
    """ResNet-56's 64-d global average pool after layer3 (before `linear`): (N, 64) float64 numpy."""
    return run_batched(net.pool, images).double().numpy()

def gaussian_stats(feats):
    """Mean and (unbiased) covariance of (N, D) features, float64."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 (Dowson & Landau 1982; FID's formula)."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():          # a singular product: offset the diagonals (as mseitzer/pytorch-fid)
        eps = 1e-6 * np.eye(len(mu1))
        covmean = scipy.linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))

# -----------------------------------------------------------------------------
# 2. Real images: the fixed train subsets and the cached reference statistics

def fail(msg):
    """A one-line error for bad input, instead of a traceback from deep inside."""
    sys.exit(f"cifar10.py: error: {msg}")

def image_folder(root, split):
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        fail(f"--data-path {root} has no {split}/ folder: expected ROOT/{{train,test}}/<class>/*.jpg "
             f"(tar -xzf shared/data/cifar10.tar.gz gives ROOT = cifar10_jpg)")
    ds = irepa.ImageFolder(path, 32)                                            # items: uint8 (3, 32, 32), label
    ds.root = path
    return ds

def load_images(ds, indices):
    """uint8 (N, 3, 32, 32) and int64 labels (N,) of ds[indices]."""
    items = [ds[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

def train_subsets(ds):
    """The reference subset (REF_SIZE images) and the held-out subset (HELD_OUT more), one seeded permutation."""
    if len(ds) < REF_SIZE + HELD_OUT:
        fail(f"{len(ds)} images in the train folder; the reference and held-out sets need {REF_SIZE + HELD_OUT}")
    perm = np.random.default_rng(SEED).permutation(len(ds))
    return perm[:REF_SIZE], perm[REF_SIZE:REF_SIZE + HELD_OUT]

def reference_stats(net, train, out_dir):
    """(mu, sigma) of the reference subset, cached in out_dir/ref_stats.npz under a key naming the subset's
    files (relative path and size), so another copy of the same data reuses it and other data recomputes it."""
    ref, _ = train_subsets(train)
    listing = ''.join(f'{os.path.relpath(p, train.root)} {os.path.getsize(p)}\n' for p, _ in
                      (train.samples[i] for i in ref))
    key = hashlib.sha256(listing.encode()).hexdigest()
    path = os.path.join(out_dir, 'ref_stats.npz')
    if os.path.isfile(path):
        with np.load(path) as cached:
            if str(cached['key']) == key:
                return cached['mu'], cached['sigma']
    t0 = time.time()
    mu, sigma = gaussian_stats(fd_features(net, load_images(train, ref)[0]))
    os.makedirs(out_dir, exist_ok=True)
    with open(path + '.tmp', 'wb') as f:                                        # written atomically
        np.savez(f, mu=mu, sigma=sigma, key=key)
    os.replace(path + '.tmp', path)
    print(f"reference: {len(ref)} images of {train.root} -> {path} ({time.time() - t0:.0f} s)", flush=True)
    return mu, sigma

def read_samples(path):
    """An ADM-style npz (arr_0: uint8 (N, 32, 32, 3), as written by sample.py) -> uint8 (N, 3, 32, 32)."""
    if not os.path.isfile(path):
        fail(f"{path}: no such file")
    try:
        with np.load(path) as npz:
            arr = npz['arr_0']
    except Exception as e:
        fail(f"{path} is not an npz with an 'arr_0' array ({type(e).__name__}: {e})")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (32, 32, 3):
        fail(f"{path}: arr_0 is {arr.dtype} {arr.shape}; expected uint8 (N, 32, 32, 3) images")
    if len(arr) < 2:
        fail(f"{path}: {len(arr)} image(s); a covariance needs at least 2 (the FD's noise floor is ~0.1 at 2,000)")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

# -----------------------------------------------------------------------------
# 3. Commands

def cmd_fd(args):
    """The FD of the images in args.file vs the reference; the last line printed is the FD alone."""
    images = read_samples(args.file)
    train = image_folder(args.data_path, 'train')
    net = hubconf.resnet56()
    mu_ref, sigma_ref = reference_stats(net, train, args.out_dir)
    mu, sigma = gaussian_stats(fd_features(net, images))
    print(f"FD of {len(images)} images in {args.file} vs {REF_SIZE} reference images of {train.root}:")
    print(f"{frechet_distance(mu, sigma, mu_ref, sigma_ref):.4f}")

def cmd_check(args):
    """The sanity numbers: test accuracy of both ResNets and the FD of held-out real train images."""
    test, train = image_folder(args.data_path, 'test'), image_folder(args.data_path, 'train')
    images, labels = load_images(test, range(len(test)))
    net = hubconf.resnet56()
    for name, model in (('ResNet-56', net), ('ResNet-20', hubconf.resnet20_stage3())):
        t0 = time.time()
        logits = run_batched(model, images)                                     # (N, 10), the classifier head
        dt = time.time() - t0
        acc = (logits.argmax(1) == labels).float().mean().item()
        print(f"{name} test accuracy: {100 * acc:.2f}% ({len(images)} images, {len(images) / dt:.0f} img/s)")
    mu_ref, sigma_ref = reference_stats(net, train, args.out_dir)
    _, held = train_subsets(train)
    t0 = time.time()
    feats = fd_features(net, load_images(train, held)[0])
    dt = time.time() - t0
    fd = frechet_distance(*gaussian_stats(feats), mu_ref, sigma_ref)
    print(f"FD of {len(held)} held-out train images vs the {REF_SIZE}-image reference: {fd:.4f} "
          f"({len(held) / dt:.0f} img/s, loading included)")

def main(argv=None):
    parser = argparse.ArgumentParser(description="CIFAR-10: vanilla SiT vs REPA vs iREPA, scored by a ResNet-56 FD.")
    parser.add_argument("--out-dir", default=os.path.join(HERE, 'cifar10'), help="outputs and the cached reference")
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('fd', help="FD of an npz of uint8 (N, 32, 32, 3) images vs the train reference")
    p.add_argument('file', help="ADM-style npz (arr_0), e.g. sample.py's samples.npz")
    p.add_argument('--data-path', required=True, help="CIFAR-10 root holding train/<class>/*.jpg")
    p.set_defaults(func=cmd_fd)
    p = sub.add_parser('check', help="ResNet-56 / ResNet-20 test accuracy and the FD of real held-out images")
    p.add_argument('--data-path', required=True, help="CIFAR-10 root holding train/ and test/")
    p.set_defaults(func=cmd_check)
    args = parser.parse_args(argv)
    args.func(args)

if __name__ == "__main__":
    main()
