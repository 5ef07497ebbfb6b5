"""
hfcache.py -- the authors' released ImageNet, read with pyarrow and written as a prepared folder.

The official README's data (Hugging Face REPA-E/iREPA-collections `data/`; its Option A downloads
both datasets, Option B the latents only) is two datasets saved to disk by Hugging Face `datasets`,
each with its validation split in val/:

    data/imagenet-latents-images/            image: the 256 px ADM crop as a PNG (the Image
                                             feature: a struct of PNG bytes and path), label
    data/imagenet-latents-sdvae-ft-mse-f8d4/ id: the row number; data: float32 [8, 32, 32] (some
                                             copies [1, 8, 32, 32]), the SD-VAE posterior's mean
                                             (channels 0-3) and std (4-7) of the unflipped crop

A folder holds state.json (its `_data_files` list the shards), dataset_info.json (the features)
and the shards, Arrow IPC stream files. The rows follow ImageFolder's order (classes sorted, files
sorted), so row i of both datasets is the same image (official ldm/dataset.py pairs them by index).
prepare.py converts them into a prepared folder (data.py's format); this file reads and checks them
(and writes small copies for bench.py --hf-convert and the tests):

    # Option A, latent setting: the authors' crops, labels and moments
    python prepare.py --hf-images data/imagenet-latents-images \\
        --hf-latents data/imagenet-latents-sdvae-ft-mse-f8d4 --out prepared/in256
    # Option A, pixel setting: crops and labels
    python prepare.py --hf-images data/imagenet-latents-images --vae none --out prepared/in256px
    # Option B: your own ImageNet (its crops and class names), the authors' moments
    python prepare.py --data-path imagenet/train \\
        --hf-latents data/imagenet-latents-sdvae-ft-mse-f8d4 --out prepared/in256
    # the validation split: the same with .../val

The moments are stored as every prepared folder has them, (mean, logvar), logvar = 2 log std (log
in float64, rounded once), so the training step is the same for all: exp(0.5 logvar) in float32
gives std back to a relative 2^-25 |logvar| + 2^-23, at most 1.02e-6 over the VAE's logvar range
[-30, 20]; z = mean + std eps moves by that fraction of std eps only (tested). Only this file
needs pyarrow (pip install pyarrow); the `datasets` library is not needed.
"""
import bisect
import hashlib
import io
import json
import multiprocessing
import os
from functools import lru_cache

import numpy as np
from PIL import Image

import data

IMAGES_COLUMNS, LATENTS_COLUMNS = ('image', 'label'), ('id', 'data')
# An Arrow IPC stream ends with this marker (continuation, length 0); a file cut at a message
# boundary reads without an error, but lacks it.
END_OF_STREAM = b'\xff\xff\xff\xff\x00\x00\x00\x00'

def import_pyarrow():
    try:
        import pyarrow
        import pyarrow.compute
    except ImportError:
        raise RuntimeError("reading the authors' Hugging Face caches needs pyarrow: "
                           "pip install pyarrow") from None
    return pyarrow

# -----------------------------------------------------------------------------
# A dataset saved by Hugging Face `datasets`, read with pyarrow

@lru_cache(maxsize=8)
def open_stream(path):
    """One Arrow stream file as a table over a memory map (nothing copied); the 8 last used stay
    open in each process."""
    pa = import_pyarrow()
    try:
        with open(path, 'rb') as f:
            f.seek(max(os.path.getsize(path) - len(END_OF_STREAM), 0))
            end = f.read()
        table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing (state.json lists it): the download is "
                                f"incomplete; download it again") from None
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path} is truncated or not an Arrow stream ({e}); "
                         f"download it again") from None
    if end != END_OF_STREAM:
        raise ValueError(f"{path} is truncated (no end-of-stream marker); download it again")
    return table

def read_json(path):
    with open(path) as f:
        return json.load(f)

def png_struct(t):
    """datasets' Image feature: a struct whose `bytes` are binary."""
    pa = import_pyarrow()
    return (pa.types.is_struct(t) and t.get_field_index('bytes') >= 0
            and (pa.types.is_binary(t.field('bytes').type)
                 or pa.types.is_large_binary(t.field('bytes').type)))

def nested_float32(t):
    """Nested lists of float32: datasets' Sequence of Sequences, or its ArrayND extension type
    (read as its storage, the same lists)."""
    pa = import_pyarrow()
    if isinstance(t, pa.BaseExtensionType):
        t = t.storage_type
    depth = 0
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t, depth = t.value_type, depth + 1
    return depth > 0 and t == pa.float32()

def integers(t):
    return import_pyarrow().types.is_integer(t)

# Each column's Arrow type: the test, and what a type that fails it is not.
COLUMN_TYPES = {'image': (png_struct, "a struct with binary 'bytes' (datasets' Image feature)"),
                'label': (integers, "an integer type"), 'id': (integers, "an integer type"),
                'data': (nested_float32, "nested lists of float32")}

class SavedDataset:
    """A dataset folder (state.json, dataset_info.json, the shards): every shard listed present,
    whole, with `columns` of COLUMN_TYPES, the same in each; rows(start, stop) reads across
    shards."""
    def __init__(self, path, columns):
        import_pyarrow()
        self.path, self.columns = os.path.normpath(path), columns
        state = os.path.join(self.path, 'state.json')
        if not os.path.isfile(state):
            raise FileNotFoundError(
                f"{self.path} has no state.json: not a dataset saved by Hugging Face datasets "
                f"(give data/imagenet-latents-images or data/imagenet-latents-sdvae-ft-mse-f8d4, "
                f"or a val/)")
        try:
            self.files = [os.path.join(self.path, d['filename'])
                          for d in read_json(state)['_data_files']]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{state} is unreadable ({type(e).__name__}: {e})") from None
        if not self.files:
            raise ValueError(f"{state} lists no shards")
        for p in self.files:
            have = open_stream(p).column_names
            if (missing := [c for c in columns if c not in have]):
                raise ValueError(f"{p} has no column {missing[0]!r} (it has {', '.join(have)}): "
                                 f"not the dataset expected here")
            schema = open_stream(p).select(columns).schema
            if p == self.files[0]:
                for field in schema:
                    if not COLUMN_TYPES[field.name][0](field.type):
                        raise ValueError(f"{p}: column {field.name!r} is {field.type}, not "
                                         f"{COLUMN_TYPES[field.name][1]}")
                first = schema
            elif schema != first:
                raise ValueError(f"{p}: its columns' types differ from {self.files[0]}'s")
        self.starts = np.cumsum([0] + [open_stream(p).num_rows for p in self.files]).tolist()
        if not len(self):
            raise ValueError(f"{self.path} has no rows")
        try:
            self.features = read_json(os.path.join(self.path, 'dataset_info.json'))['features']
        except (OSError, ValueError, KeyError, TypeError):
            self.features = {}

    def __len__(self):
        return self.starts[-1]

    def file_of(self, row):
        return self.files[bisect.bisect_right(self.starts, row) - 1]

    def column(self, name):
        """A whole column of scalars as numpy (labels, ids)."""
        return np.concatenate([open_stream(p).column(name).to_numpy() for p in self.files])

    def pieces(self, start, stop):
        """Rows [start, stop) as (file, first row, table) for each shard they are in."""
        for k, p in enumerate(self.files):
            lo, hi = max(start, self.starts[k]), min(stop, self.starts[k + 1])
            if lo < hi:
                yield p, lo, open_stream(p).select(self.columns).slice(lo - self.starts[k], hi - lo)

    def rows(self, start, stop):
        """Rows [start, stop) as one table."""
        return import_pyarrow().concat_tables([t for _, _, t in self.pieces(start, stop)])

def nested_floats(column, what, first=0):
    """A column of equal-shaped nested lists -> float32 numpy (rows, *shape), with no Python loop
    over elements: each level's list lengths checked equal, then the values taken flat. The first
    row that differs from the first row or misses a value is named (the column's rows are numbered
    from `first`)."""
    pa = import_pyarrow()
    arr, shape = column.combine_chunks(), [len(column)]
    if isinstance(arr, pa.ExtensionArray):                       # datasets' ArrayND features
        arr = arr.storage
    while isinstance(arr, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)):
        n = pa.compute.fill_null(pa.compute.list_value_length(arr), -1).to_numpy()   # -1: null
        if (bad := (n < 0) | (n != n[:1])).any():
            j = int(np.argmax(bad))     # the level's lists are row-major, prod(shape[1:]) a row
            raise ValueError(f"{what}: row {first + j // int(np.prod(shape[1:]))} " + (
                "has a missing value" if n[j] < 0 else f"is shaped differently from row {first}"))
        shape.append(int(n[0]) if len(n) else 0)
        arr = arr.flatten()
    if arr.null_count:
        j = int(np.argmax(arr.is_null().to_numpy(zero_copy_only=False)))
        raise ValueError(f"{what}: row {first + j // int(np.prod(shape[1:]))} has a missing value")
    return arr.to_numpy(zero_copy_only=False).reshape(shape)

def nested(arr):
    """numpy (n, *dims) float32 -> the column datasets writes for nested Sequences:
    list<...<float>>."""
    pa = import_pyarrow()
    values = pa.array(arr.reshape(-1))
    for d in reversed(arr.shape[1:]):
        n = len(values) // d
        offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
        values = pa.ListArray.from_arrays(offsets, values)
    return values

def save_to_disk(path, table, features, shards=2):
    """What datasets' save_to_disk writes, for bench.py and the tests: `shards` Arrow stream files
    of small record batches, state.json listing them (its fingerprint: the files' hash),
    dataset_info.json with the features."""
    pa = import_pyarrow()
    os.makedirs(path)
    bounds = np.linspace(0, table.num_rows, shards + 1).astype(int)
    names = [f'data-{k:05d}-of-{shards:05d}.arrow' for k in range(shards)]
    h = hashlib.sha256()
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
        file = os.path.join(path, name)
        with pa.OSFile(file, 'wb') as f, pa.ipc.new_stream(f, table.schema) as w:
            for batch in table.slice(lo, hi - lo).to_batches(max_chunksize=2):
                w.write_batch(batch)
        with open(file, 'rb') as f:
            h.update(f.read())
    data.write_json(os.path.join(path, 'state.json'), {
        '_data_files': [{'filename': n} for n in names], '_fingerprint': h.hexdigest()[:16],
        '_format_columns': None, '_format_kwargs': {}, '_format_type': None,
        '_output_all_columns': False, '_split': None})
    data.write_json(os.path.join(path, 'dataset_info.json'), {
        'citation': '', 'description': '', 'features': features, 'homepage': '', 'license': ''})

# -----------------------------------------------------------------------------
# The authors' rows as prepare.py's source

class OfficialImageNet:
    """What prepare.py writes from: images and labels of the authors' images dataset (Option A)
    or of a class folder (Option B, data.ImageFolder's order), the authors' moments (latent
    setting). Checked at start: shards present and whole, columns, the lengths agree, ids
    contiguous, labels in class order, the first row's sizes; each shard as it is read: shapes,
    finite values, std >= 0, image sizes."""
    def __init__(self, image_size, hf_images=None, hf_latents=None, data_path=None):
        self.image_size = image_size
        self.images = SavedDataset(hf_images, IMAGES_COLUMNS) if hf_images else None
        self.latents = SavedDataset(hf_latents, LATENTS_COLUMNS) if hf_latents else None
        self.folder = data.ImageFolder(data_path, image_size) if data_path else None
        if self.images is not None:
            labels = self.images.column('label')
            names = (self.images.features.get('label') or {}).get('names')     # a ClassLabel's
            self.classes = names or [str(c) for c in range(int(labels.max(initial=-1)) + 1)]
            if len(labels) and not 0 <= labels.min() <= labels.max() < len(self.classes):
                raise ValueError(f"{self.images.path}: labels {labels.min()}..{labels.max()}, but "
                                 f"{len(self.classes)} class names in dataset_info.json")
            # PreparedFolder keeps class counts and reads the labels back in class-major order
            if (down := np.flatnonzero(np.diff(labels) < 0)).size:
                i = int(down[0]) + 1
                raise ValueError(f"{self.images.file_of(i)}: label {labels[i]} after "
                                 f"{labels[i - 1]} (row {i}): the rows are not in ImageFolder's "
                                 f"order")
        else:
            labels = np.array([y for _, y in self.folder.samples])
            self.classes = list(self.folder.classes)
        self.count = len(labels)
        self.class_counts = np.bincount(labels, minlength=len(self.classes)).tolist()
        if self.latents is not None:
            if len(self.latents) != self.count:
                where = (self.images.path if self.images is not None
                         else f"{data_path} (its images, sorted)")
                raise ValueError(f"{self.latents.path} has {len(self.latents)} rows, {where} "
                                 f"{self.count}: row i of the latents is image i, so the counts "
                                 f"must agree")
            ids = self.latents.column('id')
            if (bad := np.flatnonzero(ids != np.arange(len(ids)))).size:
                i = int(bad[0])
                raise ValueError(f"{self.latents.file_of(i)}: row {i} has id {ids[i]}: the ids "
                                 f"are not contiguous (a shard missing from state.json, or out of "
                                 f"order?)")
        # The source: the folder's listing, each dataset's state.json (its shards, a fingerprint).
        h = hashlib.sha256(data.source_hash(self.folder, data_path).encode() if data_path else b'')
        for d in (self.images, self.latents):
            if d is not None:
                with open(os.path.join(d.path, 'state.json'), 'rb') as f:
                    h.update(f.read())
        self.source = h.hexdigest()
        self.read_images(0, 1)                      # the sizes, before any shard is written
        if self.latents is not None:
            self.read_moments(0, 1)

    def __len__(self):
        return self.count

    def manifest(self):
        """What a prepared folder's manifest says of this source, beside data.py's keys."""
        return dict(images_from='hf-arrow-png' if self.images is not None else 'class-folder',
                    moments_from='hf-arrow-mean-std' if self.latents is not None else None,
                    latents_per_image=1 if self.latents is not None else None)

    def read_images(self, start, stop):
        """uint8 (n, S, S, 3): the PNGs decoded as they are (Option A), or ADM's crop of the
        folder's files (Option B; an unreadable one stops: its latent row is its own)."""
        S = self.image_size
        out = np.empty((stop - start, S, S, 3), np.uint8)
        if self.images is None:
            for i in range(start, stop):
                path = self.folder.samples[i][0]
                try:
                    out[i - start] = self.folder.load(path).permute(1, 2, 0).numpy()
                except Exception as e:
                    raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}); row {i} of "
                                     f"the latents is this image: fix it") from None
            return out
        column = self.images.rows(start, stop).column('image').combine_chunks()
        for i, png in enumerate(column.field('bytes').to_pylist(), start):
            where = f"{self.images.file_of(i)}: row {i}'s image"
            if png is None:
                raise ValueError(f"{where} has no PNG bytes (a path only): not the released files")
            try:
                with Image.open(io.BytesIO(png)) as im:
                    arr = np.asarray(im.convert('RGB'))
            except Exception as e:
                raise ValueError(f"{where} is unreadable ({type(e).__name__}: {e})") from None
            if arr.shape != (S, S, 3):
                raise ValueError(f"{where} is {arr.shape[1]}x{arr.shape[0]}, not {S}x{S} "
                                 f"(--image-size): the authors' crops are used as they are")
            out[i - start] = arr
        return out

    def read_moments(self, start, stop):
        """float32 (n, 8, S/8, S/8): (mean, logvar = 2 log std) of the authors' (mean, std)."""
        h, parts = self.image_size // 8, []
        for path, lo, table in self.latents.pieces(start, stop):     # each Arrow file on its own
            v = nested_floats(table.column('data'), f"{path} column 'data'", lo)
            if v.shape[1:] == (1, 8, h, h):             # the singleton form: a batch axis kept
                v = v[:, 0]
            if v.shape[1:] != (8, h, h):
                raise ValueError(f"{path}: row {lo}'s 'data' is {list(v.shape[1:])}, not [8, {h}, "
                                 f"{h}] (or [1, 8, {h}, {h}]) for {self.image_size} px")
            parts.append(v)
        v = np.concatenate(parts)
        for bad, what in [(~np.isfinite(v).all(axis=(1, 2, 3)), "a value that is not finite"),
                          ((v[:, 4:] < 0).any(axis=(1, 2, 3)), "a negative std (channels 4-7)")]:
            if bad.any():
                i = start + int(np.argmax(bad))
                raise ValueError(f"{self.latents.file_of(i)}: row {i} has {what}: not the (mean, "
                                 f"std) of a posterior")
        with np.errstate(divide='ignore'):              # std 0 -> logvar -inf -> exp gives 0 back
            logvar = (2 * np.log(v[:, 4:].astype(np.float64))).astype(np.float32)
        return np.concatenate([v[:, :4], logvar], axis=1)

    def write_shard(self, out, k, shard_size):
        """Shard k's files, moments first: the images file marks a shard done (as prepare.py)."""
        start, stop = k * shard_size, min((k + 1) * shard_size, self.count)
        if self.latents is not None:
            data.save_npy(os.path.join(out, f'moments-{k:05d}.npy'), self.read_moments(start, stop))
        data.save_npy(os.path.join(out, f'images-{k:05d}.npy'), self.read_images(start, stop))
        return k

# -----------------------------------------------------------------------------
# Shards written by worker processes (PNG decoding is the cost: ~1 ms per 256 px image)

worker_job = None                                   # a worker's (source, out, shard_size)

def write_shards(source, out, shards, shard_size, workers):
    """Writes `shards` (their numbers) in `workers` processes (0: this one), yielding each number
    once written; a worker's error is raised here, its message unchanged."""
    if workers == 0:
        for k in shards:
            yield source.write_shard(out, k, shard_size)
        return
    # The source reaches each worker once (inherited when forked), not with every task.
    with multiprocessing.Pool(workers, initializer=set_worker_job,
                              initargs=(source, out, shard_size)) as pool:
        yield from pool.imap_unordered(worker_write_shard, shards)

def set_worker_job(*job):
    global worker_job
    worker_job = job

def worker_write_shard(k):
    source, out, shard_size = worker_job
    return source.write_shard(out, k, shard_size)
