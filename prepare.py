"""
prepare.py -- a class-folder dataset, prepared once for fast training: ADM's center crop at the
setting's resolution, stored losslessly as raw uint8 arrays, and for the latent setting the SD-VAE
posterior moments of every image, so that the training step runs no VAE encoder (as the official
ldm/ code, REPA and fast-DiT do: End2End-Diffusion/iREPA ldm/preprocessing/dataset_tools.py
`convert` and `encode`).

    # latent: crops + moments
    python prepare.py --data-path imagenet/train --out prepared/in256
    # pixel setting: crops only
    python prepare.py --data-path imagenet/train --out prepared/in256px --vae none
    # each rank its shards
    torchrun --nproc_per_node=8 prepare.py --data-path imagenet/train --out prepared/in256
    # or convert the authors' released ImageNet (hfcache.py; pip install pyarrow), no VAE run:
    # Option A (pixel setting: --vae none, no --hf-latents), Option B (--data-path + --hf-latents)
    python prepare.py --hf-images data/imagenet-latents-images \
        --hf-latents data/imagenet-latents-sdvae-ft-mse-f8d4 --out prepared/in256 --num-workers 16
    # train from it
    python irepa.py --encoder dinov2_vitb14 --irepa --data-path prepared/in256

The output folder (data.py defines the format: its PreparedFolder reads it):
    manifest.json      resolution, crop, VAE name, its weights' sha256 and latent statistics,
                       class names and counts, image count, shard size, a hash of the source
                       listing, per shard a hash of its images' sizes and dates, complete or
                       not; from --hf-*: where images and moments came from, one latent per image
    images-NNNNN.npy   uint8 (n, S, S, 3): shard NNNNN's ADM center crops, in ImageFolder's order
    moments-NNNNN.npy  float32 (n, 8, S/8, S/8): cat([mean, logvar]) of the SD-VAE posterior
                       (latent only)
Raw arrays are read memory-mapped at 3,700-6,500 images/s per core (a PNG decodes at ~450/s, a
full-size JPEG with ADM's crop at 140-180/s), so one loader worker feeds a GPU. Killed at any point,
a rerun continues: finished shards are kept (each written to a temporary file, then renamed) and
the rest redone, and so are shards whose images were edited since (their sizes or dates differ).
"""
import argparse
import contextlib
import hashlib
import os
import time

import numpy as np
import torch
import torch.distributed as dist

import data
import hfcache
import irepa
import runs
import vae
from runs import fail

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            h.update(block)
    return h.hexdigest()

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-path', default=None, help="root/<class>/<image>: the raw dataset")
    p.add_argument('--hf-images', default=None,
                   help="the authors' images dataset (data/imagenet-latents-images or its val/): "
                        "its PNG crops and labels, instead of --data-path")
    p.add_argument('--hf-latents', default=None,
                   help="the authors' latents dataset (data/imagenet-latents-sdvae-ft-mse-f8d4 or "
                        "its val/): its moments for the images' rows, instead of running the VAE")
    p.add_argument('--out', required=True,
                   help="the prepared folder (created; a rerun continues it)")
    p.add_argument('--image-size', type=int, default=256,
                   help="the setting's resolution (latent, pixel: 256)")
    p.add_argument('--vae', default='sd-vae-ft-mse', choices=['sd-vae-ft-mse', 'none'],
                   help="the latent setting's SD-VAE (moments stored); "
                        "none: images only (pixel, demo)")
    p.add_argument('--shard-size', type=int, default=1000,
                   help="images per shard file (the unit of resuming)")
    p.add_argument('--batch-size', type=int, default=50, help="images per VAE forward")
    p.add_argument('--num-workers', type=int, default=8,
                   help="loader processes decoding and cropping (--hf-*: converting)")
    return p.parse_args(argv)

def main(argv=None):
    args = get_args(argv)
    latent = args.vae != 'none'
    runs.check_ranges(args, dict(image_size=8 if latent else 1, shard_size=1, batch_size=1,
                                  num_workers=0))
    if latent and args.image_size % 8:
        fail(f"--image-size {args.image_size} is not divisible by 8, the SD-VAE's downsampling")
    official = args.hf_images or args.hf_latents
    if bool(args.hf_images) == bool(args.data_path):
        fail("give either --data-path (a class folder) or --hf-images (the authors' images): "
             "one, not both")
    if args.hf_latents and not latent:
        fail("--hf-latents with --vae none: the pixel setting stores no moments")
    if args.hf_images and latent and not args.hf_latents:
        fail("the latent setting from --hf-images needs --hf-latents (the authors' moments); "
             "--vae none prepares the pixel setting")
    rank, world, device = irepa.setup_distributed()
    master = rank == 0
    if official:
        dataset = runs.call_or_fail(hfcache.OfficialImageNet, args.image_size, args.hf_images,
                                    args.hf_latents, args.data_path)
        classes, class_counts, source = dataset.classes, dataset.class_counts, dataset.source
    else:
        dataset = runs.call_or_fail(data.ImageFolder, args.data_path, args.image_size)
        classes, source = dataset.classes, data.source_hash(dataset, args.data_path)
        class_counts = np.bincount([y for _, y in dataset.samples],
                                   minlength=len(classes)).tolist()
    S, n_all = args.image_size, len(dataset)
    num_shards = -(-n_all // args.shard_size)

    def shard_len(k):
        """The number of images in shard k (the last shard may be short)."""
        return min(args.shard_size, n_all - k * args.shard_size)

    # the manifest first (complete: false), so that a rerun or another dataset's run is recognised
    manifest = dict(format=data.PREPARED_FORMAT, resolution=S, crop='adm-center', vae=None,
                    vae_sha256=None, latents_scale=None, latents_bias=None,
                    class_names=list(classes), class_counts=class_counts, count=n_all,
                    shard_size=args.shard_size, source=source, complete=False)
    sd_vae = None
    if official:
        manifest.update(dataset.manifest())
    if latent and official:
        # The authors' moments: the statistics file only, no VAE weights (vae_sha256 stays None).
        with runs.node_first(world):
            scale, bias = runs.call_or_fail(vae.read_stats)
        manifest.update(vae=args.vae, latents_scale=scale.tolist(), latents_bias=bias.tolist())
    elif latent:
        # One download a node.
        with runs.node_first(world):
            sd_vae = runs.call_or_fail(vae.SDVAE, device)
        manifest.update(vae=args.vae, vae_sha256=file_sha256(vae.cached_file(vae.VAE_FILE)),
                        latents_scale=sd_vae.scale.flatten().tolist(),
                        latents_bias=sd_vae.bias.flatten().tolist())
    folder = dataset.folder if official else dataset            # a class folder's images, if any
    if folder is not None and master:           # (one os.stat per image: on rank 0 alone)
        manifest['shard_stamps'] = data.shard_stamps(folder, args.shard_size)
    # every rank checks (so all stop alike) before rank 0 writes the manifest: of a new folder, or of
    # one whose images changed since some of its shards were written (those shards removed first)
    path = os.path.join(args.out, 'manifest.json')
    if (problem := runs.output_dir_problem(args.out)):
        fail(f"--out {problem}")
    stale, write = [], not os.path.isfile(path)           # write: the manifest, new or changed
    if not write:
        try:
            old = data.read_manifest(path)
        except ValueError as e:
            fail(f"--out {args.out}: {e}; choose an empty folder (or empty this one)")
        differ = [k for k in manifest if k not in ('complete', 'shard_stamps')
                  and old.get(k) != manifest[k]]
        if differ:
            fail(f"--out {args.out} holds another prepared dataset (these differ from this run's: "
                 f"{', '.join(differ)}); choose an empty folder")
        if 'shard_stamps' in manifest:
            stamps = old.get('shard_stamps')
            if isinstance(stamps, list) and len(stamps) == num_shards:
                stale = [k for k in range(num_shards) if stamps[k] != manifest['shard_stamps'][k]]
                if stale and args.hf_latents:
                    fail(f"{len(stale)} shard(s) of --out {args.out} hold images edited since (first: "
                         f"{stale[0]}), and --hf-latents has the moments of the old ones: restore "
                         f"the images, or prepare with the VAE into an empty folder")
            elif master:                                    # (written by an older prepare.py)
                runs.warn(f"--out {args.out}: its manifest has no stamps of its images' sizes and "
                          f"dates, so shards written before are kept as they are; from now on an "
                          f"edited image's shard is written again")
            write = stamps != manifest['shard_stamps']
    elif [f for f in os.listdir(args.out) if f != 'manifest.json.tmp']:    # (a kill's leftover)
        fail(f"--out {args.out} holds files but no manifest.json to say what they are; choose an "
             f"empty folder")
    if world > 1:
        dist.barrier()
    if master and write:
        redo = [k for k in stale if data.shard_done(args.out, k, shard_len(k), S, latent)]
        for k in stale:
            for kind in ('images', 'moments'):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(args.out, f'{kind}-{k:05d}.npy'))
        data.write_json(path, manifest)
        if redo:
            print(f"{len(redo)} shard(s) were written from images edited since (first: {redo[0]}): "
                  f"writing them again", flush=True)
    if world > 1:
        dist.barrier()

    # each rank its shards: k = rank, rank + world, ...
    mine = [k for k in range(rank, num_shards, world)
            if not data.shard_done(args.out, k, shard_len(k), S, latent)]
    todo = sum(shard_len(k) for k in mine)
    print(f"rank {rank}: {len(mine)} of {len(range(rank, num_shards, world))} shards to write "
          f"({todo} images)", flush=True)
    t0, done, unreadable, errors = time.time(), 0, [], []

    def written(k):
        nonlocal done
        done += shard_len(k)
        rate = done / (time.time() - t0)
        print(f"rank {rank}: shard {k + 1}/{num_shards} | {done}/{todo} images | "
              f"{rate:.0f} img/s | {(todo - done) / rate / 60:.1f} min left", flush=True)

    if official:                    # read, checked and converted in --num-workers processes
        try:
            for k in hfcache.write_shards(dataset, args.out, mine, args.shard_size,
                                          args.num_workers):
                written(k)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            errors = [str(e)]                       # said by every rank, after the others
    else:                           # decoded by --num-workers loader processes, encoded here
        for k in mine:
            idx = list(range(k * args.shard_size, min((k + 1) * args.shard_size, n_all)))
            loader = torch.utils.data.DataLoader(data.Flagged(dataset, idx),
                                                 batch_size=args.batch_size,
                                                 num_workers=args.num_workers)
            images, moments, bad = [], [], []
            for x, _, j, why in loader:                                         # uint8 (B, 3, S, S)
                bad += [(dataset.samples[int(i)][0], w) for i, w in zip(j, why) if i >= 0]
                images.append(x.permute(0, 2, 3, 1).numpy())                   # (B, S, S, 3)
                if sd_vae is not None:
                    # In fp32, as the on-the-fly step; encode returns logvar already clamped.
                    with torch.no_grad():
                        mean, logvar = sd_vae.vae.encode(x.to(device).float() / 127.5 - 1)
                    moments.append(torch.cat([mean, logvar], dim=1).cpu().numpy())
            if bad:                                         # not written: the manifest never lies
                unreadable += bad
                print(f"rank {rank}: shard {k + 1}/{num_shards} not written: {len(bad)} unreadable "
                      f"image(s), the first {bad[0][0]} ({bad[0][1]})", flush=True)
                continue
            # Moments first: the images file marks a shard done.
            if sd_vae is not None:
                data.save_npy(os.path.join(args.out, f'moments-{k:05d}.npy'),
                              np.concatenate(moments))
            data.save_npy(os.path.join(args.out, f'images-{k:05d}.npy'), np.concatenate(images))
            written(k)
    if world > 1:                                   # every rank ends alike: no rank left waiting
        every = [None] * world
        dist.all_gather_object(every, (unreadable, errors))
        unreadable, errors = sum((u for u, _ in every), []), sum((e for _, e in every), [])
    if errors:
        runs.fail_together(errors[0])
    if unreadable:
        paths = ', '.join(p for p, _ in unreadable[:3]) + (', ...' if len(unreadable) > 3 else '')
        runs.fail_together(f"{len(unreadable)} unreadable image(s) ({paths}; the first: "
                           f"{unreadable[0][1]}), so their shards were not written: fix them and "
                           f"run prepare.py again (to drop them instead, remove them and prepare "
                           f"into an empty folder)")
    if master:
        missing = [k for k in range(num_shards)
                   if not data.shard_done(args.out, k, shard_len(k), S, latent)]
        if missing:
            fail(f"{len(missing)} shard(s) missing after the run (first: {missing[0]}); "
                 f"run it again to continue")
        manifest['complete'] = True
        data.write_json(path, manifest)
        minutes = (time.time() - t0) / 60
        print(f"prepared {n_all} images in {num_shards} shards at {args.out} ({minutes:.1f} min)")
    if world > 1:
        dist.destroy_process_group()
    return args.out

if __name__ == '__main__':
    main()
