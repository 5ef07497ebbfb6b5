"""
experiments/cifar10.py -- vanilla SiT vs REPA vs iREPA on CIFAR-10 (32 px), with a weight-free HOG target and a
pretrained ResNet-20 target, scored by a Frechet distance (FD) on the features of a CIFAR-10 ResNet-56.

The FD is FID (Heusel et al. 2017, arXiv 1706.08500) with the Inception network swapped for a ResNet-56 trained
on CIFAR-10 (experiments/hubconf.py, akamaster/pytorch_resnet_cifar10 weights): a small, CPU-fast network that
sees 32 px images at their native size. The reference is 10,000 train images (a fixed, seeded subset).

Data: CIFAR-10 as class folders, ROOT/{train,test}/<class>/<image>. From the official python archive
(cifar-10-python.tar.gz, www.cs.toronto.edu/~kriz/cifar.html):
    python experiments/cifar10.py prep cifar-10-python.tar.gz ROOT  # 60,000 PNGs (the committed runs: JPEGs, ~28 dB)

    python experiments/cifar10.py run --data-path ROOT              # the whole experiment (hours on 2 cores, resumable)
    python experiments/cifar10.py run --data-path ROOT --quick      # every piece end to end in about a minute
    python experiments/cifar10.py check --data-path ROOT            # ResNet-56/-20 test accuracy, FD noise floor
    python experiments/cifar10.py fd samples.npz --data-path ROOT   # FD of sample.py's npz; the last line is the FD

`run` trains every arm x seed with irepa.py's own training code and one recipe for all (RECIPE below, passed to
irepa.py on its command line on top of its demo setting): the main table's arms first, then the second's.
It scores the EMA model by FD at 3 points along training, measures LDS/CDS at the end, and writes results.md,
fd_curve.png and a sample grid per arm to --out-dir. Killed at any point, a rerun skips finished pieces (their
results/<arm>-s<seed>.json) and resumes unfinished runs from their checkpoints (under results/cifar10/).
The reference statistics are computed once and cached in --out-dir (default experiments/cifar10/ref_stats.npz).
"""
import argparse
import glob
import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)                                                    # the repository
sys.path[:0] = [ROOT, HERE]                                    # irepa.py (repo root), hubconf.py
import hubconf  # noqa: E402
import irepa    # noqa: E402
import data  # noqa: E402
import runs  # noqa: E402
import trained  # noqa: E402
import metrics  # noqa: E402
import sample   # noqa: E402

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
        fail(f"--data-path {root} has no {split}/ folder: expected ROOT/{{train,test}}/<class>/<image> "
             f"(`cifar10.py prep cifar-10-python.tar.gz ROOT` makes it)")
    ds = data.ImageFolder(path, 32)                                            # items: uint8 (3, 32, 32), label
    ds.root = path
    return ds

class BatchUnpickler(pickle.Unpickler):
    """The official CIFAR-10 batches are pickles of a dict with a numpy array: allow numpy's array rebuilding and
    nothing else (a pickle can run any code it names)."""
    def find_class(self, module, name):
        if (module.split('.')[0], name) in {('numpy', '_reconstruct'), ('numpy', 'ndarray'), ('numpy', 'dtype'),
                                            ('_codecs', 'encode')}:             # bytes, as Python 3 pickles them
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")

def cmd_prep(args):
    """cifar-10-python.tar.gz -> ROOT/train/<class>/NNNNN.png (data_batch_1..5) and ROOT/test/... (test_batch)."""
    try:
        with tarfile.open(args.archive) as tar:
            batch = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            read = lambda name: BatchUnpickler(tar.extractfile(batch[name]), encoding='bytes').load()
            classes = [c.decode() for c in read('batches.meta')[b'label_names']]
            for split, names in (('train', [f'data_batch_{i}' for i in range(1, 6)]), ('test', ['test_batch'])):
                n = 0
                for name in names:
                    b = read(name)
                    images = np.asarray(b[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                    for img, label in zip(images, b[b'labels']):
                        os.makedirs(folder := os.path.join(args.root, split, classes[label]), exist_ok=True)
                        Image.fromarray(img).save(os.path.join(folder, f'{n:05d}.png'))
                        n += 1
                print(f"wrote {n} {split} images to {os.path.join(args.root, split)}")
    except (OSError, EOFError, KeyError, IndexError, ValueError, tarfile.TarError, pickle.UnpicklingError) as e:
        fail(f"{args.archive}: not the CIFAR-10 python archive ({type(e).__name__}: {e})")

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

# -----------------------------------------------------------------------------
# 4. The experiment: every arm and seed trained by irepa.py with one recipe, scored along the way

# arm -> (encoder, recipe entries of its own, --irepa). ResNet-20's last stage is a small pretrained CNN target (the CPU-size analogue
# of the paper's pretrained encoders); HOG is weight-free, pure spatial structure (paper section 3). The main table is
# the paper's central claim; the second adds HOG and iREPA's two halves alone (paper Table 2), each half a recipe
# of irepa.py's configuration (projector, spatial_norm).
MAIN_ARMS = {'vanilla': ('none', {}, False),
             'REPA-ResNet20': ('resnet20_stage3', {}, False),
             'iREPA-ResNet20': ('resnet20_stage3', {}, True)}
SECOND_ARMS = {'REPA-HOG': ('hog', {}, False), 'iREPA-HOG': ('hog', {}, True),
               'conv-only-ResNet20': ('resnet20_stage3', dict(projector='conv', spatial_norm=False), False),
               'spnorm-only-ResNet20': ('resnet20_stage3', dict(projector='mlp', spatial_norm=True), False)}
ARMS = {**MAIN_ARMS, **SECOND_ARMS}
SEEDS = (0, 1, 2)

# The title question (`title` below): REPA (the paper's correlation is over REPA, not iREPA) with targets whose
# global information and spatial structure vary independently (experiments/hubconf.py). With vanilla, REPA-ResNet20
# and REPA-HOG from the tables above. The alphas were chosen by measurement: per-token probe accuracy rises
# 48% -> 60% -> 68% -> 75% and LDS falls 0.41 -> 0.26 -> 0.18 -> 0.10 from alpha 0 to 0.25, 0.5, 1.
TITLE_ARMS = {'REPA-ResNet20-global0.25': ('resnet20_stage3_global025', {}, False),
              'REPA-ResNet20-global0.5': ('resnet20_stage3_global05', {}, False),
              'REPA-ResNet20-global1': ('resnet20_stage3_global1', {}, False),
              'REPA-ResNet20-shuffled': ('resnet20_stage3_shuffled', {}, False),
              'REPA-ResNet20-stage2': ('resnet20_stage2_pooled', {}, False),
              'REPA-ResNet20-random': ('resnet20_random_stage3', {}, False),
              'REPA-pixels': ('pixels', {}, False)}
TITLE_SEEDS = (0, 1)

# One recipe for every arm. SiT-T/4 (depth 6, width 192; an 8x8 token grid at 32 px, the grid of ResNet-20's last
# stage; aligned after block 2) trains at 0.26-0.46 s per batch of 64 in bf16 on 2 cores with AVX512-BF16 (hosts
# differ): 3,000 steps (~4 epochs) take 13-23 min, REPA's 2048-wide MLP projector adds up to as much again, and each
# FD evaluation 1.5-3 min: the main table's 9 runs take ~3.4 h on an AMD EPYC host. lr 1e-3 suits a tiny model
# and a short run (the demo's value, scaled to batch 64).
# The EMA must fit the run: the models are scored through their EMA, which after s steps still holds decay^s of the
# initial weights, so its time constant 1 / (1 - decay) is kept at most a tenth of the first evaluation step
# (1,000 steps here: 0.99, a 100-step average). Change the steps and the decay follows.
STEPS = (1000, 2000, 3000)
EMA_DECAY = 1 - 10 / STEPS[0]
# The recipe: irepa.py's demo setting with these entries (the steps come from `steps` below).
RECIPE = dict(model='SiT-T/4', image_size=32, global_batch_size=64, lr=1e-3, ema_decay=EMA_DECAY, hflip=True,
              log_every=100, sampler=dict(mode='ode', heun=True, num_steps=12, cfg_scale=1.0))
QUICK_RECIPE = dict(RECIPE, log_every=1, global_batch_size=8, sampler=dict(mode='ode', heun=True, num_steps=2))
FULL = dict(steps=STEPS, fd_samples=2000, metric_images=1000, seeds=SEEDS, probe_images=10_000, recipe=RECIPE)
QUICK = dict(steps=(2, 4), fd_samples=20, metric_images=20, seeds=SEEDS[:2], probe_images=40, recipe=QUICK_RECIPE)

def recipe(cfg):
    """The whole recipe: irepa.py's demo setting with cfg's entries."""
    return {**irepa.RECIPES['demo'], **cfg['recipe']}

def recipe_argv(entries):
    """irepa.py's command line for recipe entries: --key=value (a Python literal; a string as it is)."""
    return [f"--{k}={v if isinstance(v, str) else repr(v)}" for k, v in entries.items()]
METRIC_T = 0.5          # noise level of SiT's hidden states for LDS / CDS (t = 0 data, t = 1 noise)

def git_commit():
    """The commit of the code that runs (the experiment runs from a fixed commit: a git worktree)."""
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          cwd=HERE).stdout.strip() or 'unknown'

def fd_of(model, net, ref, n, seed, s):
    """FD of n samples of the EMA model (sampler s: the recipe's, no CFG, labels balanced) vs the reference,
    and the samples (uint8 (n, 32, 32, 3))."""
    images = sample.sample(model, torch.arange(n) % model.num_classes, mode=s['mode'], heun=s['heun'],
                           num_steps=s['num_steps'], seed=seed, batch_size=500)
    feats = fd_features(net, torch.from_numpy(images).permute(0, 3, 1, 2))
    return frechet_distance(*gaussian_stats(feats), *ref), images

def spatial_metrics(feats):
    """Mean LDS and CDS (official definitions, metrics.py) of (N, T, D) tokens."""
    return dict(lds=float(metrics.lds(feats).mean()), cds=float(metrics.cds(feats).mean()))

def test_images(args, n):
    test = image_folder(args.data_path, 'test')
    idx = np.random.default_rng(SEED).permutation(len(test))[:n]
    return load_images(test, idx)

def find_run(root):
    """The run folder under root that has a checkpoint, or None. A folder a kill left before its first checkpoint
    is removed, so the run starts afresh under the same name."""
    found = None
    for d in sorted(glob.glob(os.path.join(root, '*'))):
        if runs.latest_checkpoint(d):
            found = found or d
        elif os.path.isdir(d):
            shutil.rmtree(d)
    return found

def run_arm(args, arm, seed, cfg, net, ref):
    """Train one arm and seed up to each evaluation step (resuming its checkpoints), record the FD there, and with
    the last FD the spatial structure of SiT's aligned hidden states. Results: out_dir/results/<arm>-s<seed>.json."""
    path = os.path.join(args.out_dir, 'results', f'{arm}-s{seed}.json')
    here = git_commit()
    res = (json.load(open(path)) if os.path.isfile(path) else
           dict(arm=arm, seed=seed, commit=here, fd={}, train_s=0.0, eval_s=0.0))
    if 'lds' in res:
        return res
    if here not in res['commit'].split('+'):                                   # continued under other code: say so
        res['commit'] += '+' + here
    encoder, entries, use_irepa = {**ARMS, **TITLE_ARMS}[arm]
    root, last = os.path.join(args.runs_dir, f'{arm}-s{seed}'), cfg['steps'][-1]
    for step in cfg['steps']:
        if str(step) in res['fd'] and (step != last or 'lds' in res):            # the last step: FD and LDS
            continue
        run_dir = find_run(root)
        ckpt = run_dir and os.path.join(run_dir, 'checkpoints', f'{step:07d}.pt')
        if ckpt is None or not os.path.isfile(ckpt):
            t0 = time.time()
            argv = (['--resume', run_dir] if run_dir else
                    ['--setting', 'demo', '--encoder', encoder, '--irepa' if use_irepa else '--no-irepa',
                     '--hub-dir', HERE, '--data-path', os.path.join(args.data_path, 'train'), '--seed', str(seed),
                     '--results-dir', root, '--ckpt-every', str(cfg['steps'][0])]
                    + recipe_argv({**cfg['recipe'], **entries}))
            run_dir = irepa.main(argv + ['--max-steps', str(step)])
            res['train_s'] += time.time() - t0
            ckpt = os.path.join(run_dir, 'checkpoints', f'{step:07d}.pt')
        t0 = time.time()
        model, _ = trained.load_sit(ckpt)
        res['fd'][str(step)], images = fd_of(model, net, ref, cfg['fd_samples'], seed, cfg['recipe']['sampler'])
        if step == last and seed == cfg['seeds'][0]:                            # for the grid: 8 per class
            np.save(os.path.join(args.out_dir, 'results', f'{arm}-samples.npy'), images[:80])
        res['eval_s'] += time.time() - t0
        print(f"{arm} seed {seed} step {step}: FD {res['fd'][str(step)]:.3f}", flush=True)
        if step == last:                   # LDS / CDS of SiT's hidden state after block encoder_depth, t = METRIC_T
            images, labels = test_images(args, cfg['metric_images'])
            h, _ = trained.noised_features(model, images.float() / 127.5 - 1, labels, METRIC_T,
                                         torch.Generator().manual_seed(SEED))
            res.update(spatial_metrics(h))
        data.write_json(path, res)
    return res

def target_metrics(args, cfg):
    """LDS / CDS of each alignment target on test images, raw and after iREPA's spatial normalisation."""
    path = os.path.join(args.out_dir, 'results', 'targets.json')
    if os.path.isfile(path):
        return json.load(open(path))
    images, _ = test_images(args, cfg['metric_images'])
    gamma, out = recipe(cfg)['spnorm_gamma'], {}
    for name in sorted({enc for enc, _, _ in ARMS.values() if enc != 'none'}):
        encoder = irepa.load_encoder(name, 8, None if name == 'hog' else HERE)
        with torch.no_grad(), irepa.autocast('cpu'):
            z = torch.cat([encoder(images[i:i + 250].float()).float() for i in range(0, len(images), 250)])
        out[name] = dict(raw=spatial_metrics(z), spatial_norm=spatial_metrics(irepa.spatial_norm(z, gamma)))
    data.write_json(path, out)
    return out

def mean_sd(values, sign=False):
    """'mean ± sd' of the values that are not None (the mean alone for one; signed with sign=True)."""
    values, f = [v for v in values if v is not None], '+.2f' if sign else '.2f'
    if not values:
        return '-'
    return f"{np.mean(values):{f}} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else f"{values[0]:{f}}"

def t_interval(values):
    """Mean and the half-width of its 95% Student-t interval (None with fewer than two values)."""
    import scipy.stats
    n = len(values)
    if n < 2:
        return float(np.mean(values)), None
    return float(np.mean(values)), float(scipy.stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))

def reach_step(fd, steps, target):
    """The first step at which an FD curve reaches `target`, interpolated linearly in log FD between evaluation
    points; steps[0] or less is returned as None with 'before', never reached as None with 'never'."""
    vals = [fd[str(s)] for s in steps]
    if vals[0] <= target:
        return None, 'before'
    for (s0, f0), (s1, f1) in zip(zip(steps, vals), zip(steps[1:], vals[1:])):
        if f1 <= target:
            return s0 + (s1 - s0) * (math.log(f0) - math.log(target)) / (math.log(f0) - math.log(f1)), ''
    return None, 'never'

def paired(results, arm, base, step):
    """arm's FD minus base's at `step`, seed by seed: {seed: difference} (same seed: same data order, draws and
    initial SiT weights, so the seed's luck cancels)."""
    fd = {(r['arm'], r['seed']): r['fd'].get(step) for r in results}
    return {s: fd[arm, s] - fd[base, s] for (a, s) in fd if a == arm and fd[arm, s] is not None
            and fd.get((base, s)) is not None}

def fd_table(arms, results, steps):
    lines = ["| arm | target | " + " | ".join(f"FD @ {s}" for s in steps) + " | LDS (SiT) | seeds done |",
             "|---|---|" + "---|" * (len(steps) + 2)]
    for arm in arms:
        rs = [r for r in results if r['arm'] == arm]
        lines.append(f"| {arm} | {ARMS[arm][0]} | " + " | ".join(mean_sd([r['fd'].get(s) for r in rs]) for s in steps)
                     + f" | {mean_sd([r.get('lds') for r in rs])} | {sum('lds' in r for r in rs)} |")
    return lines

def diff_table(pairs, results, last, seeds):
    lines = [f"| FD @ {last} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | 95% t-interval |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for arm, base in pairs:
        d = paired(results, arm, base, last)
        if not d:
            continue
        mean, half = t_interval(list(d.values()))
        lines.append(f"| {arm} − {base} | " + " | ".join(f"{d[s]:+.2f}" if s in d else '-' for s in seeds) +
                     f" | {mean:+.2f} | " + (f"[{mean - half:+.2f}, {mean + half:+.2f}]" if half is not None else '-')
                     + " |")
    return lines

def speed_table(arms, results, steps, seeds):
    """The paper's way of saying it: when does each arm first reach vanilla's final FD (same seed)?"""
    last = str(steps[-1])
    target = {r['seed']: r['fd'][last] for r in results if r['arm'] == 'vanilla' and last in r['fd']}
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (range) |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for arm in arms:
        cells, ratios = [], []
        for s in seeds:
            r = next((r for r in results if r['arm'] == arm and r['seed'] == s), None)
            if r is None or s not in target or any(str(x) not in r['fd'] for x in steps):
                cells.append('-')
                continue
            step, why = reach_step(r['fd'], steps, target[s])
            if step is not None:
                ratios.append(step / steps[-1])
                cells.append(f"{step:.0f} ({step / steps[-1]:.2f}x)")
            else:
                ratios.append(steps[0] / steps[-1] if why == 'before' else math.inf)
                cells.append(f"≤ {steps[0]}" if why == 'before' else f"> {steps[-1]}")
        summary = '-'
        if ratios:
            fmt = lambda v: '∞' if v == math.inf else f"{v:.2f}x"
            finite = [v for v in ratios if v != math.inf]
            before = '≤ ' if any(c.startswith('≤') for c in cells) else ''       # reached by the first evaluation
            summary = (f"{before}{np.mean(ratios):.2f}x" if len(finite) == len(ratios) else '-') + \
                f" ({fmt(min(ratios))} – {fmt(max(ratios))})"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {summary} |")
    return lines

# Where the committed runs were made (written into results.md; the per-run table above has each run's times).
HISTORY = """\
All 21 runs were made from a git worktree at commit 1971f41, 2 CPU cores, bf16 autocast. The first five main-table runs
ran on an Intel Xeon host, partly beside other work (so the sums above exceed a quiet host's); the rest on AMD EPYC
hosts. On a quiet AMD EPYC host the seed-2 main-table runs took 17 min for vanilla, 31 min for REPA and 17 min for
iREPA (iREPA seed 1: 23 min), training and the three FD evaluations together. The second table took about 6.8 h in
all: 33 to 35 min per run for REPA-HOG, 18 to 20 for iREPA-HOG, 17 to 20 for conv-only and 31 to 37 for spnorm-only on
the faster hosts; its seed-2 runs ran on a slower AMD EPYC host (0.93 s a step for REPA-HOG against 0.54 s) and took
34 to 67 min (REPA-HOG's 67 includes 1,000 steps retrained after its checkpoint was lost with a machine). An earlier
version of this experiment (EMA 0.999, 2 seeds) measured mostly how far the EMA still lagged behind the model (0.999^s
of the initial weights remained: 37% at 1K steps), so its curves lay on top of each other; it was withdrawn."""

def write_report(args, cfg, results, targets):
    """results.md (tables of mean ± sd, paired differences with t-intervals, convergence speed), fd_curve.png and a
    sample grid per arm."""
    steps, seeds, rec = [str(s) for s in cfg['steps']], cfg['seeds'], recipe(cfg)
    last = steps[-1]
    commits = sorted({r.get('commit', 'unknown') for r in results}) or [git_commit()]
    lines = ["# CIFAR-10: vanilla SiT vs REPA vs iREPA (produced by experiments/cifar10.py)", "",
             f"Recipe for every run: {rec['model']} at 32 px, batch {rec['global_batch_size']}, lr {rec['lr']}, "
             f"EMA {rec['ema_decay']:.3g} (time constant {1 / (1 - rec['ema_decay']):.0f} steps; first evaluation at "
             f"step {steps[0]}), {last} steps, horizontal flips, proj-coeff {rec['proj_coeff']}, gamma "
             f"{rec['spnorm_gamma']}, bf16 autocast where the CPU has it. FD: {cfg['fd_samples']} EMA samples (Heun "
             f"ODE, {rec['sampler']['num_steps']} steps, no CFG, balanced labels) vs {REF_SIZE} train images, "
             f"ResNet-56 features; 2,000 real held-out images score 0.08 (`cifar10.py check`). LDS: "
             f"{cfg['metric_images']} test images, SiT's hidden state after block "
             f"{irepa.SiT_sizes['T']['encoder_depth']} at t = {METRIC_T}. Seeds {', '.join(map(str, seeds))}, paired: "
             f"within a seed every arm has the same data order, the same t, noise, flips and label drops at each step, "
             f"and the same initial SiT weights (irepa.py draws each step's randomness from the seed and the step, and "
             f"builds the projector after SiT).", "",
             "## Main table: the paper's central claim with a pretrained target (FD, lower is better; mean ± sd over "
             "seeds)", ""]
    lines += fd_table(MAIN_ARMS, results, steps)
    lines += ["", f"Paired differences at step {last} (negative: the first arm is better), with the mean's 95% "
              f"t-interval over seeds:", ""]
    lines += diff_table([('iREPA-ResNet20', 'REPA-ResNet20'), ('REPA-ResNet20', 'vanilla'),
                         ('iREPA-ResNet20', 'vanilla')], results, last, seeds)
    lines += ["", f"Convergence speed: the step at which each arm first reaches vanilla's FD at step {last} (same "
              f"seed), interpolated on log FD between evaluation points; as a fraction of {last} steps:", ""]
    lines += speed_table(MAIN_ARMS, results, cfg['steps'], seeds)
    if any(r['arm'] in SECOND_ARMS for r in results):
        lines += ["", "## Second table: a weight-free HOG target, and iREPA's two halves with ResNet-20", ""]
        lines += fd_table(SECOND_ARMS, results, steps)
        lines += [""]
        lines += diff_table([('iREPA-HOG', 'REPA-HOG'), ('REPA-HOG', 'vanilla'), ('iREPA-HOG', 'vanilla'),
                             ('conv-only-ResNet20', 'REPA-ResNet20'), ('spnorm-only-ResNet20', 'REPA-ResNet20')],
                            results, last, seeds)
        lines += [""]
        lines += speed_table(SECOND_ARMS, results, cfg['steps'], seeds)
    lines += ["", "## Every run", "", "| arm | seed | " + " | ".join(f"FD @ {s}" for s in steps) +
              " | LDS | CDS | train (s) | eval (s) | commit |", "|---|---|" + "---|" * (len(steps) + 5)]
    for r in results:
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(f"{r['fd'][s]:.3f}" if s in r['fd'] else '-'
                                                                   for s in steps) +
                     f" | {r.get('lds', float('nan')):.3f} | {r.get('cds', float('nan')):.4f} | "
                     f"{r['train_s']:.0f} | {r['eval_s']:.0f} | {r.get('commit', '-')} |")
    lines += ["", "## The targets' own spatial structure (the paper's predictor)", "",
              "| target | LDS raw | CDS raw | LDS spatial norm | CDS spatial norm |", "|---|---|---|---|---|"]
    for name, m in targets.items():
        lines.append(f"| {name} | {m['raw']['lds']:.3f} | {m['raw']['cds']:.4f} | {m['spatial_norm']['lds']:.3f} | "
                     f"{m['spatial_norm']['cds']:.4f} |")
    done = sum('lds' in r for r in results)
    main_done = sum(r['arm'] in MAIN_ARMS and 'lds' in r for r in results)
    lines += ["", f"{done} of {len(ARMS) * len(seeds)} runs finished ({main_done} of {len(MAIN_ARMS) * len(seeds)} in "
              f"the main table). Wall time summed over runs (training + FD evaluations): "
              f"{sum(r['train_s'] + r['eval_s'] for r in results) / 60:.1f} min on 2 CPU cores.",
              f"Command: `python experiments/cifar10.py run --data-path ROOT{' --quick' if args.quick else ''}`, "
              f"run from a git worktree at commit {', '.join(commits)}."]
    if not args.quick:
        lines += ["", "## Hosts and history", "", HISTORY]
    open(os.path.join(args.out_dir, 'results.md'), 'w').write('\n'.join(lines) + '\n')
    fd_curve(results, cfg['steps'], os.path.join(args.out_dir, 'fd_curve.png'))
    classes = image_folder(args.data_path, 'test').classes
    for arm in ARMS:
        path = os.path.join(args.out_dir, 'results', f'{arm}-samples.npy')
        if os.path.isfile(path):
            images = np.load(path)                                              # labels 0, 1, ..., K-1, 0, 1, ...
            sample.save_grid(images, os.path.join(args.out_dir, f'grid_{arm}.png'), class_names=classes,
                             labels=list(np.arange(len(images)) % len(classes)), nrow=len(classes))

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194)]

def fd_curve(results, steps, path, W=800, H=420, m=60, legend=190):
    """log FD vs training step, one line per arm (the mean over seeds) with the seeds' range as a bar; the legend
    stands right of the axes, so it covers no line, and names each arm's number of seeds."""
    from PIL import Image, ImageDraw
    im = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(im)
    vals = [v for r in results for v in r['fd'].values()]
    if not vals:
        return im.save(path)
    lo, hi = math.log(min(vals)), math.log(max(vals))
    hi = hi if hi > lo else lo + 1
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)                     # no point on the frame
    right = W - legend                                                          # the axes end here
    X = lambda s: m + 20 + (right - m - 40) * (s - steps[0]) / max(1, steps[-1] - steps[0])
    Y = lambda v: H - m - (H - 2 * m) * (math.log(v) - lo) / (hi - lo)      # log scale
    d.line([(m, m - 10), (m, H - m), (right, H - m)], fill='black')
    for s in steps:
        d.text((X(s) - 12, H - m + 6), str(s), fill='black')
    for k in range(5):
        v = math.exp(lo + (hi - lo) * k / 4)
        d.text((4, Y(v) - 6), f"{v:.1f}", fill='black')
    d.text(((m + right) // 2 - 40, H - 22), "training step", fill='black')
    d.text((m, 14), "FD (ResNet-56 features, log scale) vs step; line: mean over n seeds, bar: seed range",
           fill='black')
    arms = [a for a in ARMS if any(r['arm'] == a for r in results)]
    for i, arm in enumerate(arms):
        pts, c = [], COLOURS[list(ARMS).index(arm) % len(COLOURS)]
        for s in steps:
            v = [r['fd'][str(s)] for r in results if r['arm'] == arm and str(s) in r['fd']]
            if v:
                x = X(s) + 3 * (i - len(arms) // 2)
                pts.append((x, Y(np.mean(v))))
                d.line([(x, Y(min(v))), (x, Y(max(v)))], fill=c, width=2)
                d.ellipse([(x - 3, pts[-1][1] - 3), (x + 3, pts[-1][1] + 3)], fill=c)   # an evaluation point
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        d.line([(right + 10, m + 16 * i + 6), (right + 28, m + 16 * i + 6)], fill=c, width=3)
        n = len({r['seed'] for r in results if r['arm'] == arm and r['fd']})
        d.text((right + 34, m + 16 * i), f"{arm} n={n}", fill=c)
    im.save(path)

def collect(args, cfg, arms):
    return [json.load(open(p)) for seed in cfg['seeds'] for arm in arms
            for p in [os.path.join(args.out_dir, 'results', f'{arm}-s{seed}.json')] if os.path.isfile(p)]

# -----------------------------------------------------------------------------
# 5. The title question (iREPA sections 2-3, Figures 1, 3c and 4): across targets, does REPA's FD follow the
#    target's global information (linear-probe accuracy) or its spatial structure (LDS, CDS, RMSC)?

# target -> its REPA arm; the first two come from the tables above. Alpha 0 of the global mix is resnet20_stage3.
TITLE_TARGETS = {'resnet20_stage3': 'REPA-ResNet20', 'hog': 'REPA-HOG',
                 **{enc: arm for arm, (enc, _, _) in TITLE_ARMS.items()}}
ALPHAS = {0.0: 'resnet20_stage3', 0.25: 'resnet20_stage3_global025', 0.5: 'resnet20_stage3_global05',
          1.0: 'resnet20_stage3_global1'}
PREDICTORS = ('probe', 'probe_token', 'lds', 'lds_half', 'cds', 'rmsc')
PROBE_WD = 1e-4         # L2 penalty on the probe's weights (features standardised first)
PROBE_TOL = 1e-6        # the probe is fit until no entry of the loss's gradient exceeds this
PROBE_FIT = f"float64 L-BFGS to max |gradient| <= {PROBE_TOL:g}, wd {PROBE_WD:g}"   # the probe, in the cache

def fit_probe(x, y, wd=PROBE_WD, tol=PROBE_TOL, max_iter=10_000):
    """(W, b) minimising cross-entropy(x @ W + b, y) + wd * ||W||^2 (multinomial logistic regression) by full-batch
    L-BFGS (strong Wolfe line search) from zero weights, in float64, until the largest gradient entry is <= tol.
    Why not a fixed iteration count: on raw pixels 200 float32 iterations stop short of the optimum, and the test
    accuracy then moves in the third decimal with the cap. The problem is convex, so converged means one answer."""
    x = x.double()
    W = torch.zeros(x.shape[1], int(y.max()) + 1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(W.shape[1], dtype=torch.float64, requires_grad=True)
    # tolerance_change=0: stop on the gradient only (the default also stops once the loss changes by < 1e-9)
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, tolerance_grad=tol, tolerance_change=0, history_size=20,
                            line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + wd * W.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    closure()                                                   # the gradient at the weights it ended on
    grad = max(W.grad.abs().max().item(), b.grad.abs().max().item())
    if not grad <= tol:
        raise RuntimeError(f"the linear probe did not converge: max |gradient| {grad:.1e} > {tol:g} after "
                           f"{opt.state[W]['n_iter']} L-BFGS iterations")
    return W.detach(), b.detach()

def linear_probe(train_x, train_y, test_x, test_y, wd=PROBE_WD):
    """Test accuracy of fit_probe's linear classifier on standardised features (train statistics)."""
    train_x, test_x = train_x.double(), test_x.double()
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    W, b = fit_probe(train_x, train_y, wd)
    return ((test_x @ W + b).argmax(1) == test_y).double().mean().item()

@torch.no_grad()
def target_tokens(name, images):
    """(N, 64, C) float32 tokens of a target, as irepa.py's training gets them (its encoder wrapper), in fp32."""
    encoder = irepa.load_encoder(name, 8, None if name == 'hog' else HERE)
    return torch.cat([encoder(images[i:i + 250].float()).float() for i in range(0, len(images), 250)])

def title_targets(args, cfg):
    """Each target measured before any training: linear-probe accuracy on the test set, of the average-pooled tokens
    (the paper's protocol) and of single tokens (every token of an image its own example), fit on train images;
    LDS (official radii: d = 1 vs d >= 6; and the paper's text, d < H/2 vs d >= H/2), CDS and RMSC of the raw tokens
    on test images. Cached in results/title_targets.json; a target missing from it, or measured with another probe
    (PROBE_FIT), is measured and added."""
    path = os.path.join(args.out_dir, 'results', 'title_targets.json')
    out = json.load(open(path)) if os.path.isfile(path) else {}
    todo = [t for t in TITLE_TARGETS if out.get(t, {}).get('probe_fit') != PROBE_FIT]
    if not todo:
        return out
    train, test = image_folder(args.data_path, 'train'), image_folder(args.data_path, 'test')
    ref, _ = train_subsets(train)
    train_x, train_y = load_images(train, ref[:cfg['probe_images']])
    test_x, test_y = load_images(test, np.random.default_rng(SEED).permutation(len(test))[:cfg['probe_images']])
    metric_x = test_x[:cfg['metric_images']]                                    # the same images as test_images()
    for name in todo:
        t0 = time.time()
        z_train, z_test = target_tokens(name, train_x), target_tokens(name, test_x)     # (N, 64, C)
        T = z_train.shape[1]
        m, H = z_test[:len(metric_x)], math.isqrt(T)
        out[name] = dict(
            probe=linear_probe(z_train.mean(1), train_y, z_test.mean(1), test_y),
            probe_token=linear_probe(z_train.flatten(0, 1), train_y.repeat_interleave(T),
                                     z_test.flatten(0, 1), test_y.repeat_interleave(T)),
            lds=float(metrics.lds(m).mean()), lds_half=float(metrics.lds(m, (H - 1) // 2, (H + 1) // 2).mean()),
            cds=float(metrics.cds(m).mean()), rmsc=float(metrics.rmsc(m).mean()), dim=z_test.shape[2],
            probe_fit=PROBE_FIT)
        print(f"target {name}: " + ", ".join(f"{k} {out[name][k]:.4f}" for k in PREDICTORS) +
              f" ({time.time() - t0:.0f} s)", flush=True)
        data.write_json(path, out)
    return out

def bootstrap(x, y, n=10_000, seed=0):
    """Pearson r and Spearman rho of y on x with 95% percentile bootstrap intervals over the points (resampled with
    replacement; resamples in which x or y is constant are skipped) -> {'r': (r, lo, hi), 'rho': (...)}."""
    import scipy.stats
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rng, rs, rhos = np.random.default_rng(seed), [], []
    for _ in range(n):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            rs.append(np.corrcoef(x[i], y[i])[0, 1])
            rhos.append(scipy.stats.spearmanr(x[i], y[i])[0])
    ci = lambda v: tuple(np.nanpercentile(v, [2.5, 97.5]))
    return dict(r=(scipy.stats.pearsonr(x, y)[0], *ci(rs)), rho=(scipy.stats.spearmanr(x, y)[0], *ci(rhos)))

def pearson(x, y):
    return float(np.corrcoef(x, y)[0, 1])

def title_runs(args, cfg):
    """{target: {seed: run}} of each target's REPA arm and of vanilla ('none'), over TITLE_SEEDS only: every target
    is compared on the same, paired seeds (the main tables' arms also have a seed 2). Read once; all else derives."""
    return {target: {r['seed']: r for r in collect(args, dict(cfg, seeds=TITLE_SEEDS), [arm])}
            for target, arm in {**TITLE_TARGETS, 'none': 'vanilla'}.items()}

def title_fd(runs, step):
    """{name: {seed: FD at step}} from {name: {seed: run}}, over the runs that reached the step."""
    return {t: {s: r['fd'][str(step)] for s, r in rs.items() if str(step) in r['fd']} for t, rs in runs.items()}

def additive_fit(fds):
    """The additive fit FD[arm, seed] = a_arm + b_seed, least squares over the finished runs of {arm: {seed: FD}}
    -> ({arm: a_arm + mean(b)}, residual sd or None, its degrees of freedom). a_arm + mean(b) puts arms finished on
    different seeds on one scale, assuming a seed moves every arm alike; an arm with every seed gets exactly its
    mean over seeds. Where no arm links the seeds the split is not identified: then the plain means, and no sd."""
    arms = [a for a in fds if fds[a]]
    seeds = sorted({s for a in arms for s in fds[a]})
    means = {a: float(np.mean(list(fds[a].values()))) for a in arms}
    if not arms:
        return {}, None, 0
    X, y = [], []                                   # one row per run: arm indicator, then seed indicator
    for i, a in enumerate(arms):
        for s, v in fds[a].items():
            x = np.zeros(len(arms) + len(seeds) - 1)                             # b of the first seed is 0
            x[i] = 1
            if seeds.index(s):
                x[len(arms) + seeds.index(s) - 1] = 1
            X.append(x)
            y.append(v)
    X, y = np.array(X), np.array(y)
    coef, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    if rank < X.shape[1]:
        return means, None, 0
    b = np.concatenate([[0.0], coef[len(arms):]])
    df = len(y) - X.shape[1]
    sd = float(np.sqrt(((X @ coef - y) ** 2).sum() / df)) if df > 0 else None
    return {a: float(coef[i] + b.mean()) for i, a in enumerate(arms)}, sd, df

def seed_adjusted(fds):
    return additive_fit(fds)[0]

def title_sit_lds(runs):
    """{target: LDS of SiT's own aligned hidden state after training, mean over the paired seeds}."""
    lds = {t: [r['lds'] for r in rs.values() if 'lds' in r] for t, rs in runs.items()}
    return {t: float(np.mean(v)) for t, v in lds.items() if v}

def title_report(args, cfg, targets):
    """title.md: the table per target, the correlations of FD with each predictor (bootstrap intervals over
    targets, and each seed alone), how much of the FD spread is seed noise, the alpha line; title_fd.png (Figure 4:
    FD against probe accuracy | against LDS) and title_alpha.png (Figure 3c: probe accuracy, LDS, FD against alpha)."""
    runs, last = title_runs(args, cfg), cfg['steps'][-1]
    fds = title_fd(runs, last)
    names = {'probe': 'probe (pooled)', 'probe_token': 'probe (token)', 'lds': 'LDS', 'lds_half': 'LDS (r = H/2)',
             'cds': 'CDS', 'rmsc': 'RMSC'}
    fd = {**seed_adjusted({t: fds[t] for t in TITLE_TARGETS}),    # the mean over seeds once every target has both
          **({'none': float(np.mean(list(fds['none'].values())))} if fds['none'] else {})}
    paired = lambda t, base: mean_sd([fds[t][s] - fds[base][s] for s in fds[t] if s in fds[base]], sign=True)
    lines = ["# The title question at CPU scale: global information or spatial structure? (experiments/cifar10.py "
             "title)", "",
             f"REPA (MLP projector, the main table's recipe: SiT-T/4, 32 px, batch 64, {last} steps, FD of 2,000 EMA "
             f"samples) with each alignment target below, seeds {', '.join(map(str, TITLE_SEEDS))} for every target "
             f"('vs vanilla': adjusted FD minus vanilla's mean over the same seeds). Probe: a "
             f"linear classifier (multinomial logistic regression, L2 penalty {PROBE_WD} on standardised features, "
             f"L-BFGS in float64 until no gradient entry exceeds {PROBE_TOL:g}) fit on {cfg['probe_images']} train "
             f"images, accuracy on {cfg['probe_images']} test images; "
             f"'pooled' classifies the average-pooled tokens (the paper's protocol), 'token' each token alone. LDS / "
             f"CDS / RMSC: raw tokens of {cfg['metric_images']} test images; LDS with the official radii (d = 1 vs "
             f"d >= 6) and with the paper's text (d < H/2 vs d >= H/2, i.e. d <= 3 vs d >= 4 on the 8x8 grid). Last "
             f"column, measured after training and so not a predictor: the LDS of SiT's own hidden state after the "
             f"aligned block (t = {METRIC_T}, {cfg['metric_images']} test images), mean over seeds.", "",
             "| target | dim | " + " | ".join(names[p] for p in PREDICTORS) +
             f" | FD @ {last} | adjusted | vs vanilla | seeds | SiT's LDS |",
             "|---|---|" + "---|" * (len(PREDICTORS) + 5)]
    sit, adjusted = title_sit_lds(runs), lambda t: f"{fd[t]:.2f}" if t in fd else '-'
    versus = lambda t: f"{fd[t] - fd['none']:+.2f}" if t in fd and 'none' in fd else '-'
    for t in TITLE_TARGETS:
        m = targets[t]
        lines.append(f"| {t} | {m['dim']} | " + " | ".join(f"{m[p]:.3f}" for p in PREDICTORS) +
                     f" | {mean_sd(list(fds[t].values()))} | {adjusted(t)} | {versus(t)} | {len(fds[t])} | " +
                     (f"{sit[t]:.3f} |" if t in sit else "- |"))
    lines.append(f"| none (vanilla SiT) | - | " + " | ".join('-' for _ in PREDICTORS) +
                 f" | {mean_sd(list(fds['none'].values()))} | {adjusted('none')} | - | "
                 f"{len(fds['none'])} | "
                 + (f"{sit['none']:.3f} |" if 'none' in sit else "- |"))
    done = [t for t in TITLE_TARGETS if fds[t]]
    corr = {}
    if len(done) >= 3:
        corr = {p: bootstrap([targets[t][p] for t in done], [fd[t] for t in done]) for p in PREDICTORS}
        by_seed = {s: [t for t in done if s in fds[t]] for s in TITLE_SEEDS}
        r_seed = lambda p, s: (f"{pearson([targets[t][p] for t in by_seed[s]], [fds[t][s] for t in by_seed[s]]):+.2f}"
                               if len(by_seed[s]) >= 3 else '-')
        lines += ["", f"FD @ {last} ('adjusted': the mean over seeds, or while a target lacks a seed, its effect "
                  f"in the additive fit FD = target + seed over the finished REPA runs) against each "
                  f"predictor, over the {len(done)} targets with a finished run; 95% percentile bootstrap intervals "
                  f"over targets (10,000 resamples); then Pearson r of each seed's FD alone, over the targets that "
                  f"seed has finished (in brackets: while the seeds are incomplete these are different sets). The "
                  f"paper (27 encoders, gFID): probe |r| = 0.26, LDS 0.852, CDS 0.847, RMSC 0.888, all with better "
                  f"structure giving lower FID (negative r).", "",
                  "| predictor | Pearson r | 95% CI | Spearman rho | 95% CI | " +
                  " | ".join(f"r, seed {s} ({len(by_seed[s])})" for s in TITLE_SEEDS) + " |",
                  "|---|---|---|---|---|" + "---|" * len(TITLE_SEEDS)]
        for p, c in corr.items():
            lines.append(f"| {names[p]} | {c['r'][0]:+.2f} | [{c['r'][1]:+.2f}, {c['r'][2]:+.2f}] | "
                         f"{c['rho'][0]:+.2f} | [{c['rho'][1]:+.2f}, {c['rho'][2]:+.2f}] | " +
                         " | ".join(r_seed(p, s) for s in TITLE_SEEDS) + " |")
        at = {step: seed_adjusted(title_fd({t: runs[t] for t in TITLE_TARGETS}, step))   # does it depend on when
              for step in cfg['steps']}
        def r_at(p, adj):
            ts = [t for t in done if t in adj]
            return f"{pearson([targets[t][p] for t in ts], [adj[t] for t in ts]):+.2f}" if len(ts) >= 3 else '-'
        lines += ["", "The same Pearson r with the (adjusted) FD at each evaluation step:", "",
                  "| predictor | " + " | ".join(f"r @ {step}" for step in at) + " |", "|---|" + "---|" * len(at)]
        for p in PREDICTORS:
            lines.append(f"| {names[p]} | " + " | ".join(r_at(p, adj) for adj in at.values()) + " |")
    # Seed noise, from the main tables' REPA and iREPA arms (every seed they have): the residual sd of the same fit.
    main = title_fd({arm: {r['seed']: r for r in collect(args, cfg, [arm])} for arm in ARMS if arm != 'vanilla'}, last)
    _, noise, df = additive_fit(main)
    if noise and len(done) >= 3:
        lines += ["", f"Seed noise: the same additive fit over the main tables' {sum(map(bool, main.values()))} "
                  f"REPA and iREPA arms (seeds {', '.join(map(str, cfg['seeds']))}) leaves a residual sd of "
                  f"{noise:.2f} ({df} degrees of freedom): one run's FD @ {last} carries noise of sd about "
                  f"{noise:.2f}, a paired difference of two runs {noise * math.sqrt(2):.2f}, the adjusted FD of a "
                  f"target with k seeds about {noise:.2f} / sqrt(k); the {len(done)} targets' adjusted FDs spread "
                  f"with sd {np.std([fd[t] for t in done], ddof=1):.2f}."]
        if len(fds['none']) > 1:
            lines[-1] += (f" Vanilla SiT's FD has sd {np.std(list(fds['none'].values()), ddof=1):.2f} over seeds "
                          f"{', '.join(map(str, sorted(fds['none'])))}; it is not a REPA run and stays out of the fit.")
    lines += ["", "The alpha line (Figure 3c in miniature: ResNet-20's stage-3 tokens p_i + alpha * g, g their "
              "average, the feature its classifier reads):", "",
              f"| alpha | probe (pooled) | probe (token) | LDS | CDS | FD @ {last} | vs alpha 0 |",
              "|---|---|---|---|---|---|---|"]
    for a, t in ALPHAS.items():
        m = targets[t]
        lines.append(f"| {a} | {m['probe']:.3f} | {m['probe_token']:.3f} | {m['lds']:.3f} | {m['cds']:.4f} | "
                     f"{mean_sd(list(fds[t].values()))} | {paired(t, ALPHAS[0.0]) if a else '-'} |")
    shuf = 'resnet20_stage3_shuffled'               # the other controlled change: the same tokens, no layout
    lines += ["", f"And the same tokens shuffled within each image (global information kept, spatial structure gone): "
              f"FD @ {last} {mean_sd(list(fds[shuf].values()))}, {paired(shuf, ALPHAS[0.0])} against the tokens in "
              f"place (paired by seed), {paired(shuf, 'none')} against vanilla SiT (paired by seed)."]
    used = [r for t in done for r in runs[t].values()]
    new = [r for r in used if r['arm'] in TITLE_ARMS and 'lds' in r]
    commits = sorted({r.get('commit', '-') for r in used})
    lines += ["", f"Runs from commit(s) {', '.join(commits) or '-'}. Command: `python experiments/cifar10.py title "
              f"--data-path ROOT{' --quick' if args.quick else ''}`."]
    if new:
        train, evals = (sum(r[k] for r in new) / 3600 for k in ('train_s', 'eval_s'))
        lines[-1] += (f" The {len(new)} finished runs of new targets took {train:.1f} h of training and "
                      f"{evals:.1f} h of evaluation ({60 * (train + evals) / len(new):.0f} min a run).")
    open(os.path.join(args.out_dir, 'title.md'), 'w').write('\n'.join(lines) + '\n')
    if corr:              # bars: the seeds' range (with 2 seeds or more); dashed: vanilla SiT's mean over its seeds
        spread = [(min(fds[t].values()), max(fds[t].values())) if len(fds[t]) > 1 else (fd[t], fd[t]) for t in done]
        ref = (fd['none'], 'vanilla SiT') if 'none' in fd else None
        panels = [(f"{names[p]}: pearson r={corr[p]['r'][0]:.2f}, spearman {corr[p]['rho'][0]:.2f}",
                   metrics.scatter([targets[t][p] for t in done], [fd[t] for t in done], done, names[p],
                                   ylabel=f'FD @ {last}', size=480, spread=spread, ref=ref))
                  for p in ('probe', 'lds')]
        metrics.figure(panels)[0].save(os.path.join(args.out_dir, 'title_fd.png'))
    alpha_figure(targets, fds, fd, os.path.join(args.out_dir, 'title_alpha.png'), last)

def alpha_figure(targets, fds, fd, path, last):
    """Three panels against alpha: probe accuracy (pooled and per token), LDS, FD (adjusted, as in title.md; bar:
    the seeds' range)."""
    from PIL import Image, ImageDraw
    alphas = list(ALPHAS)
    series = [("probe accuracy (o pooled, x token)", [[targets[t]['probe'] for t in ALPHAS.values()],
                                                      [targets[t]['probe_token'] for t in ALPHAS.values()]]),
              ("LDS of the target", [[targets[t]['lds'] for t in ALPHAS.values()]]),
              (f"FD @ {last} of REPA", [[fd.get(t, math.nan) for t in ALPHAS.values()]])]
    panels = []
    for title, ys in series:
        im = Image.new('RGB', (300, 260), 'white')
        d = ImageDraw.Draw(im)
        left, top, right, bottom = 50, 10, 285, 220
        vals = [v for y in ys for v in y if not math.isnan(v)] or [0, 1]
        if title.startswith('FD'):
            vals += [v for t in ALPHAS.values() for v in fds[t].values()]
        lo, hi = min(vals), max(vals)
        lo, hi = lo - 0.1 * ((hi - lo) or 1), hi + 0.1 * ((hi - lo) or 1)
        X = lambda a: left + (a - alphas[0]) / (alphas[-1] - alphas[0]) * (right - left - 20) + 10
        Y = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)
        d.rectangle([left, top, right, bottom], outline='black')
        for a in alphas:
            d.text((X(a) - 8, bottom + 6), f"{a:g}", fill='black')
        for v in (lo, (lo + hi) / 2, hi):
            d.text((4, Y(v) - 5), f"{v:.3g}", fill='black')
        d.text(((left + right) // 2 - 15, bottom + 22), "alpha", fill='black')
        for k, y in enumerate(ys):
            pts = [(X(a), Y(v)) for a, v in zip(alphas, y) if not math.isnan(v)]
            c = COLOURS[k]
            if len(pts) > 1:
                d.line(pts, fill=c, width=2)
            for x, yy in pts:
                if k == 0:
                    d.ellipse([x - 3, yy - 3, x + 3, yy + 3], fill=c)
                else:
                    d.line([x - 3, yy - 3, x + 3, yy + 3], fill=c, width=2)
                    d.line([x - 3, yy + 3, x + 3, yy - 3], fill=c, width=2)
        if title.startswith('FD'):
            for a, t in ALPHAS.items():
                if len(fds[t]) > 1:
                    d.line([X(a), Y(min(fds[t].values())), X(a), Y(max(fds[t].values()))], fill=COLOURS[0])
        panels.append((title, im))
    metrics.figure(panels)[0].save(path)

def cmd_run(args):
    cfg = QUICK if args.quick else FULL
    if args.runs_dir is None:
        args.runs_dir = os.path.join(args.out_dir, 'runs') if args.quick else os.path.join(ROOT, 'results', 'cifar10')
    os.makedirs(os.path.join(args.out_dir, 'results'), exist_ok=True)
    os.makedirs(args.runs_dir, exist_ok=True)
    t0 = time.time()
    net = hubconf.resnet56()
    ref = reference_stats(net, image_folder(args.data_path, 'train'), args.out_dir)
    targets = target_metrics(args, cfg)
    # the main table first, seed-major (every arm of a seed before the next seed), then the second table
    for arms in (MAIN_ARMS, SECOND_ARMS):
        for seed in cfg['seeds']:
            for arm in arms:
                run_arm(args, arm, seed, cfg, net, ref)
                write_report(args, cfg, collect(args, cfg, ARMS), targets)
    print(f"wrote {args.out_dir}/results.md, fd_curve.png and grid_<arm>.png ({(time.time() - t0) / 60:.1f} min)")

def cmd_title(args):
    """REPA with each title-question target, one seed of every target before the next seed (a partial set already
    answers something); resumable like `run`."""
    cfg = QUICK if args.quick else FULL
    seeds = cfg['seeds'] if args.quick else TITLE_SEEDS
    if args.runs_dir is None:
        args.runs_dir = os.path.join(args.out_dir, 'runs') if args.quick else os.path.join(ROOT, 'results', 'cifar10')
    os.makedirs(os.path.join(args.out_dir, 'results'), exist_ok=True)
    targets = title_targets(args, cfg)
    if not args.report:
        net = hubconf.resnet56()
        ref = reference_stats(net, image_folder(args.data_path, 'train'), args.out_dir)
        for seed in seeds:
            for arm in TITLE_ARMS:
                run_arm(args, arm, seed, cfg, net, ref)
                title_report(args, cfg, targets)
    title_report(args, cfg, targets)
    print(f"wrote {args.out_dir}/title.md, title_fd.png and title_alpha.png")

def cmd_report(args):
    """results.md, fd_curve.png and the grids from the results written so far, without training."""
    cfg = QUICK if args.quick else FULL
    results = collect(args, cfg, ARMS)
    write_report(args, cfg, results, target_metrics(args, cfg))
    print(f"wrote {args.out_dir}/results.md, fd_curve.png and grid_<arm>.png from {len(results)} runs")

def main(argv=None):
    parser = argparse.ArgumentParser(description="CIFAR-10: vanilla SiT vs REPA vs iREPA, scored by a ResNet-56 FD.")
    parser.add_argument("--out-dir", default=None, help="outputs and the cached reference (default: "
                        "experiments/cifar10; with --quick experiments/cifar10-quick, never the real results)")
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('prep', help="CIFAR-10's class folders (PNG) from the official python archive")
    p.add_argument('archive', help="cifar-10-python.tar.gz")
    p.add_argument('root', help="where to write ROOT/{train,test}/<class>/NNNNN.png")
    p.set_defaults(func=cmd_prep)
    p = sub.add_parser('fd', help="FD of an npz of uint8 (N, 32, 32, 3) images vs the train reference")
    p.add_argument('file', help="ADM-style npz (arr_0), e.g. sample.py's samples.npz")
    p.add_argument('--data-path', required=True, help="CIFAR-10 root holding train/<class>/<image>")
    p.set_defaults(func=cmd_fd)
    p = sub.add_parser('run', help="train and score every arm x seed (resumable); --quick: every piece in a minute")
    p.add_argument('--data-path', required=True, help="CIFAR-10 root holding train/ and test/")
    p.add_argument('--quick', action='store_true', help="tiny steps and sample counts: a smoke test of every piece")
    p.add_argument('--runs-dir', default=None, help="training runs (default results/cifar10; --quick: out-dir/runs)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser('title', help="the title question: REPA with each target of TITLE_ARMS (resumable)")
    p.add_argument('--data-path', required=True, help="CIFAR-10 root holding train/ and test/")
    p.add_argument('--quick', action='store_true', help="tiny steps and sample counts: a smoke test of every piece")
    p.add_argument('--runs-dir', default=None, help="training runs (default results/cifar10; --quick: out-dir/runs)")
    p.add_argument('--report', action='store_true', help="measure the targets and write the report; no training")
    p.set_defaults(func=cmd_title)
    p = sub.add_parser('report', help="results.md, fd_curve.png and grids from the results so far (no training)")
    p.add_argument('--data-path', required=True, help="CIFAR-10 root holding train/ and test/")
    p.add_argument('--quick', action='store_true', help="the results of a --quick run")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser('check', help="ResNet-56 / ResNet-20 test accuracy and the FD of real held-out images")
    p.add_argument('--data-path', required=True, help="CIFAR-10 root holding train/ and test/")
    p.set_defaults(func=cmd_check)
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = os.path.join(HERE, 'cifar10-quick' if getattr(args, 'quick', False) else 'cifar10')
    args.func(args)

if __name__ == "__main__":
    main()
