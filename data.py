"""
data.py -- where irepa.py's training images come from. Items are (uint8 (3, S, S), label), from:
    ImageFolder     root/<class>/<image>, with ADM's center crop (ImageNet, CIFAR-10, ...)
    Shapes          the demo's procedural shapes, drawn on the fly (no download)
    PreparedFolder  a folder prepare.py wrote once: the crops as raw arrays and, for the latent
                    setting, the SD-VAE's moments of every image (items then carry them too)
The prepared format is defined here, its reader beside the functions that write it.
"""
import hashlib
import json
import math
import os
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw

import runs

# -----------------------------------------------------------------------------
# Class folders and the demo's shapes

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

def to_rgb(im):
    """A PIL image as 8-bit RGB. PIL's convert('RGB') clips 16-bit grey (a 16-bit PNG or TIFF opens as
    mode I;16, I;16B or I) at 255, almost all white, and truncates floats (mode F): grey values
    above 255 are 16-bit, scaled round(v / 257) (65535 -> 255); floats in [0, 1] are scaled by
    255; values up to 255 are kept (8-bit data stored wider); negative ones, or over 65535, raise."""
    if im.mode in ('I', 'F') or im.mode.startswith('I;16'):
        v = np.asarray(im, dtype=np.float64)                                # (H, W)
        lo, hi = (v.min(), v.max()) if v.size else (0, 0)
        if not (0 <= lo and hi <= 65535):
            raise ValueError(f"a grey image of mode {im.mode} with values in [{lo:g}, {hi:g}]: "
                             f"save it as 8- or 16-bit")
        scale = 255 if im.mode == 'F' and hi <= 1 else 1 / 257 if hi > 255 else 1
        im = Image.fromarray(np.round(v * scale).astype(np.uint8))
    return im.convert('RGB')

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
            runs.warn(f"{root}: folder(s) without images are not classes: {', '.join(empty)}")
        self.classes = sorted(c for c, files in images.items() if files)
        # A class folder may be a link to images elsewhere, but not to the root or a folder above it
        # (`ln -s . root/self`: every image again, under a wrong label) nor into another class's
        # folder (its images twice). Sorted as lists of path parts, whatever lies inside a folder
        # comes right after it, so comparing neighbours finds every nesting.
        parts = lambda path: [p for p in os.path.realpath(path).split(os.sep) if p]     # '/' -> []
        top = parts(root)
        real = sorted((parts(os.path.join(root, c)), c) for c in self.classes)
        for r, c in real:
            if top[:len(r)] == r:
                raise FileNotFoundError(f"{os.path.join(root, c)} is a link to {root} or a folder "
                                        f"above it: it would hold every class again; remove it")
        for (a, ca), (b, cb) in zip(real, real[1:]):
            if b[:len(a)] == a:
                how = 'the same folder as' if a == b else 'a folder inside'
                raise FileNotFoundError(f"{root}: class {cb} is {how} class {ca} "
                                        f"({os.sep + os.sep.join(b)}): its images would be read twice")
        self.samples = [(path, label) for label, c in enumerate(self.classes) for path in images[c]]
        if not self.samples:
            raise FileNotFoundError(f"no images in {root}: "
                                    f"expected root/<class name>/<image>{IMG_EXTENSIONS}")
        self.image_size, self.bad = image_size, set()

    def __len__(self):
        return len(self.samples)

    def load(self, path):
        """The ADM crop of one file, uint8 (3, S, S); an unreadable file raises."""
        with Image.open(path) as im:
            arr = center_crop_arr(to_rgb(im), self.image_size)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __getitem__(self, idx):
        # 100 unreadable images in a row mean something systematic.
        for i in range(min(len(self.samples), 100)):
            path, label = self.samples[(idx + i) % len(self.samples)]
            try:
                return self.load(path), label
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
                if path not in self.bad:
                    self.bad.add(path)
                    runs.warn(f"skipping unreadable image {path} ({why}); "
                              f"{len(self.bad)} skipped so far in this process")
        raise RuntimeError(f"{i + 1} images in a row are unreadable in "
                           f"{os.path.dirname(os.path.dirname(path))}, the last {path} ({why})")

class Flagged(torch.utils.data.Dataset):
    """The images idx of an ImageFolder as (uint8 (3, S, S), label, -1, ''), an unreadable file
    flagged as (zeros, label, its index, why) where training would put the next image in its slot:
    prepare.py writes no shard that holds one, metrics.py leaves it out."""
    def __init__(self, dataset, idx):
        self.dataset, self.idx = dataset, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        path, label = self.dataset.samples[self.idx[i]]
        try:
            return self.dataset.load(path), label, -1, ''
        except Exception as e:
            S = self.dataset.image_size
            return torch.zeros(3, S, S, dtype=torch.uint8), label, self.idx[i], f"{type(e).__name__}: {e}"

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

# -----------------------------------------------------------------------------
# The prepared format (prepare.py writes it): manifest.json, then shards of raw arrays, each written
# to a temporary file and renamed, so that a kill never leaves a partial file under a real name.

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

# What a manifest holds (prepare.py writes it first with complete False, then True at the end).
MANIFEST_KEYS = dict(format=str, resolution=int, crop=str, vae=(str, type(None)),
                     vae_sha256=(str, type(None)), latents_scale=(list, type(None)),
                     latents_bias=(list, type(None)), class_names=list, class_counts=list,
                     count=int, shard_size=int, source=str, complete=bool)
# prepare.py from a class folder adds shard_stamps (data.shard_stamps), and
# prepare.py --hf-* adds images_from, moments_from and latents_per_image (hfcache.py): the rows are
# the authors' released crops and (mean, std) moments, std stored as logvar = 2 log std.

def read_manifest(path):
    """A prepared folder's manifest.json as a dict; ValueError with one line naming the file for one
    that is unreadable, not JSON, or not prepare.py's."""
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(m, dict) or m.get('format') != PREPARED_FORMAT:
        raise ValueError(f"{path} is not a prepare.py manifest ({PREPARED_FORMAT}); a folder with a "
                         f"manifest.json is read as prepared, so move it out of a class folder")
    count = lambda v, lo=0: type(v) is int and v >= lo                      # (not a bool)
    bad = [k for k, t in MANIFEST_KEYS.items() if not isinstance(m.get(k, ...), t)
           or (t is int and not count(m[k], 0 if k == 'count' else 1))]
    if not bad and not (all(isinstance(c, str) for c in m['class_names'])
                        and all(count(c) for c in m['class_counts'])
                        and len(m['class_names']) == len(m['class_counts'])):
        bad = ['class_names', 'class_counts']
    if bad:
        raise ValueError(f"{path} lacks or garbles {', '.join(bad)}: a damaged prepare.py manifest")
    return m

class PreparedFolder(torch.utils.data.Dataset):
    """A folder written by prepare.py: manifest.json, images-NNNNN.npy (uint8 (n, S, S, 3), ADM
    center crops) and, for the latent setting, moments-NNNNN.npy (float32 (n, 8, S/8, S/8): the
    SD-VAE's mean and logvar), read memory-mapped. Items: (uint8 (3, S, S), label), plus the
    moments (8, S/8, S/8) when `vae` names the VAE they were made with. Checked at start: complete,
    the resolution, crop and VAE of this run, every shard's size, the image count."""
    def __init__(self, root, image_size, vae):
        m = read_manifest(os.path.join(root, 'manifest.json'))
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
                    raise ValueError(f"{p} is missing, truncated or unreadable ({e}); prepare.py "
                                     f"with the same arguments writes it again") from None
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

def source_hash(dataset, root):
    """sha256 of the source's listing (label and file name, in order): another dataset hashes
    differently."""
    h = hashlib.sha256()
    for path, label in dataset.samples:
        h.update(f"{label} {os.path.relpath(path, root)}\n".encode())
    return h.hexdigest()

def shard_stamps(dataset, shard_size):
    """Per shard of shard_size images, a sha256 of its files' sizes and modification times (os.stat,
    nothing read): an image edited in place since its shard was written stamps differently, and
    prepare.py writes that shard again."""
    stamps = []
    for k in range(0, len(dataset.samples), shard_size):
        h = hashlib.sha256()
        for path, _ in dataset.samples[k:k + shard_size]:
            try:
                st = os.stat(path)
                h.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
            except OSError:                                 # e.g. a broken link: unreadable anyway
                h.update(b"missing\n")
        stamps.append(h.hexdigest())
    return stamps

def save_npy(path, array):
    runs.write_atomic(path, lambda f: np.save(f, array))

def write_json(path, obj):
    runs.write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))

def shard_done(out, k, n, S, latent):
    """Shard k's files exist whole, with the shapes PreparedFolder reads."""
    for kind in ('images', 'moments') if latent else ('images',):
        try:
            path = os.path.join(out, f'{kind}-{k:05d}.npy')
            if npy_shape(path) != prepared_shard(kind, n, S):
                return False
        except (OSError, ValueError):
            return False
    return True

# -----------------------------------------------------------------------------
# Which source a run reads

def open_dataset(args, ckpt):
    """The training images: a prepared folder (prepare.py; it has manifest.json), class folders, or
    without --data-path the demo's procedural shapes."""
    if args.data_path and os.path.isfile(os.path.join(args.data_path, 'manifest.json')):
        dataset = runs.call_or_fail(PreparedFolder, args.data_path, args.image_size, args.vae)
        if args.vae and args.hflip:
            runs.fail(f"{args.data_path}: its stored moments are of unflipped images; the latent "
                      f"setting trains without flips (hflip False)")
    elif args.data_path:
        dataset = runs.call_or_fail(ImageFolder, args.data_path, args.image_size)
    else:
        dataset = Shapes(50_000, args.image_size, seed=args.seed)
    if len(dataset) < args.global_batch_size:
        runs.fail(f"{len(dataset)} images are fewer than one global batch of {args.global_batch_size}")
    if ckpt is not None and list(dataset.classes) != ckpt['args']['class_names']:
        new, old = set(dataset.classes), set(ckpt['args']['class_names'])
        runs.fail(f"the classes in {args.data_path} differ from the run's (not in the run: "
                  f"{sorted(new - old)[:3]}, missing: {sorted(old - new)[:3]}); --data-path may move "
                  f"the data, not change it")
    # Another number of images would give another epoch order.
    if ckpt is not None and len(dataset) != ckpt['args']['num_images']:
        runs.fail(f"{args.data_path} has {len(dataset)} images, the run had "
                  f"{ckpt['args']['num_images']}; --data-path may move the data, not change it")
    return dataset
