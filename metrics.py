"""
metrics.py -- how spatially structured is a representation? The measurement behind iREPA.

iREPA (arXiv 2512.10794, section 3 and Appendix B) finds that the spatial structure of an encoder's
patch tokens -- how much more similar nearby patches are than distant ones -- predicts REPA's
generation quality (Pearson |r| 0.85-0.89 with gFID over 27 encoders) far better than ImageNet
linear probing does (|r| = 0.26). Per image, on the L2-normalised tokens of an H x H grid, with
Manhattan distance d between tokens:
    LDS   local vs distant similarity   mean cos at d = 1 minus mean cos at d >= 6
    CDS   correlation decay slope       -slope of the least-squares fit to mean cos at d = 1..8
    SRSS  semantic-region self-sim.     per object token: mean cos to object at d = 1
                                        minus mean cos to background at d >= 6
    RMSC  RMS spatial contrast          sqrt(mean_t ||x_t - mean_t x||^2)
Defaults are the official metrics code's; the paper's text (d < H/2 vs d >= H/2) is
lds(x, (H - 1) // 2, (H + 1) // 2).

Run it (encoders from irepa.py, checkpoints from trained.py, images from data.py):
    # raw vs spatially normalised tokens
    python metrics.py --encoder dinov2_vitb14 --data-path imagenet/val
    # + SRSS; hog needs no download
    python metrics.py --encoder hog --data-path imgs --masks masks
    # SiT's own features (Fig. 6c)
    python metrics.py --ckpt results/run/checkpoints/0400000.pt --data-path imgs
    # metrics vs gFID (Fig. 4)
    python metrics.py --correlate encoders.csv --out fig4.png
    # what spatial norm does (Fig. 6b)
    python metrics.py --viz dog.jpg --encoder dinov2_vitb14 --anchor 8 5
Images: root/<class>/<image>, ADM center crop. Masks (e.g. from SAM2): imgs/dog/1.jpg ->
masks/dog/1.png, nonzero = object. --correlate CSV: encoder,fid[,linear_probe,lds,cds,srss,rmsc];
missing metrics are measured on --data-path.
"""
import argparse
import csv
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import stats

import data
import irepa
import trained
import vae
from runs import call_or_fail, check_not_empty, check_ranges, fail, warn  # one-line errors, no traceback

METRICS = ('lds', 'cds', 'srss', 'rmsc')

# -----------------------------------------------------------------------------
# 1. The four metrics (iREPA Appendix B; official metrics/spatial_metrics.py).
#    x: (B, T, D) tokens of an H x H grid in raster order. A token is never paired with itself;
#    ordered and unordered pairs give the same means (the cosine is symmetric). Each metric returns
#    per-image values (B,).

def cosine_gram(x):
    """-> (B, T, T) cosines between the tokens, and (T, T) Manhattan distances between their grid
    positions."""
    B, T, D = x.shape
    H = math.isqrt(T)
    if H * H != T:
        raise ValueError(f"{T} tokens do not form a square grid; "
                         f"the metrics need H x H tokens in raster order")
    # Half precision is normalised in fp32; fp64 stays fp64.
    x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
    rc = torch.cartesian_prod(torch.arange(H), torch.arange(H))  # (T, 2) (row, col), raster order
    dist = (rc[:, None] - rc).abs().sum(-1).to(x.device)         # (T, T)
    return x @ x.transpose(1, 2), dist                           # (B, T, T), (T, T)

def lds(x, near_dist=1, far_dist=6):
    """Local vs distant similarity: mean cos at d = 1..near_dist minus mean cos at d >= far_dist.
    Official code: 4-neighbours vs d >= 6. Paper text (d < H/2 vs d >= H/2): near_dist=(H - 1) // 2,
    far_dist=(H + 1) // 2."""
    gram, dist = cosine_gram(x)
    near, far = (dist >= 1) & (dist <= near_dist), dist >= far_dist
    if not near.any() or not far.any():
        raise ValueError(f"a grid of {len(dist)} tokens has no pairs at distance 1..{near_dist} "
                         f"or >= {far_dist}")
    return gram[:, near].mean(1) - gram[:, far].mean(1)          # (B,)

def cds(x, dmax=8):
    """Correlation decay slope: correlogram g(d) = mean cos at distance exactly d, for d = 1..dmax
    that the grid has; least-squares fit g(d) = a + b d; returns -b (faster decay with distance =
    more spatial structure)."""
    gram, dist = cosine_gram(x)
    # (K,): the distances 1..K, K = dmax or the grid's largest distance if that is smaller
    d = torch.arange(1, min(dmax, int(dist.max())) + 1, dtype=gram.dtype, device=gram.device)
    if len(d) < 2:
        raise ValueError(f"CDS needs at least two distances to fit a slope "
                         f"(dmax={dmax}, grid too small?)")
    g = torch.stack([gram[:, dist == k].mean(1) for k in d], 1)  # (B, K) correlogram
    dc = d - d.mean()                                            # sums to 0, so g needs no centring
    return -(g @ dc) / (dc @ dc)                                 # (B,) -slope of the LS line

def srss(x, masks, d_pos=1, d_neg=6):
    """Semantic-region self-similarity. masks (B, T), 1 = object. Anchors are object tokens; per
    anchor, mean cos to object tokens at d = 1..d_pos minus mean cos to background tokens at
    d >= d_neg, averaged over the anchors that have both. NaN for an image without such an anchor
    (e.g. all object): aggregate with nanmean."""
    gram, dist = cosine_gram(x)
    fg = masks.to(device=gram.device, dtype=torch.bool)                                 # (B, T)
    if fg.shape != gram.shape[:2]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match the tokens' "
                         f"(B, T) = {tuple(gram.shape[:2])}")
    anchor = fg[:, :, None]                                                             # (B, T, 1)
    pos = (anchor & fg[:, None, :] & (dist >= 1) & (dist <= d_pos)).to(gram.dtype)      # (B, T, T)
    neg = (anchor & ~fg[:, None, :] & (dist >= d_neg)).to(gram.dtype)
    # An anchor without a pair of a kind gets 0 / 0 = NaN.
    delta = (gram * pos).sum(-1) / pos.sum(-1) - (gram * neg).sum(-1) / neg.sum(-1)     # (B, T)
    # An image where no anchor has both kinds of pair gets NaN.
    return delta.nanmean(1)                                                             # (B,)

def rmsc(x):
    """RMS spatial contrast: sqrt(mean_t ||x_t - mean_t x||^2) of the L2-normalised tokens; 0 for a
    constant grid."""
    x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
    return (x - x.mean(1, keepdim=True)).pow(2).sum(-1).mean(1).sqrt()

def all_metrics(x, masks=None):
    """{metric: (B,)} with the official defaults; SRSS only when masks are given."""
    out = dict(lds=lds(x), cds=cds(x), rmsc=rmsc(x))
    if masks is not None:
        out['srss'] = srss(x, masks)
    return out

# -----------------------------------------------------------------------------
# 2. Summaries: mean with a 95% interval, and the correlation with gFID across encoders
#    (paper Fig. 4)

def mean_ci(values):
    """Mean over images (NaNs left out) and the half-width of its 95% confidence interval
    (Student t) -> (mean, hw)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) < 2:
        return (v.mean() if len(v) else math.nan), math.nan
    return v.mean(), stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))

def correlate(table, target='fid'):
    """Pearson and Spearman r (and p-values) of linear_probe and each metric column against
    `target`, over the rows where both are known. table: {column: list of float or None}.
    -> {column: (n, r, p, rho, p_rho)}."""
    out = {}
    for col in ('linear_probe',) + METRICS:
        rows = [(a, b) for a, b in zip(table.get(col, []), table[target])
                if a is not None and b is not None]
        if len(rows) >= 3:                          # fewer points: r means nothing
            a, b = np.array(rows).T
            out[col] = (len(a), *stats.pearsonr(a, b), *stats.spearmanr(a, b))
    return out

COLUMNS = ('encoder', 'fid', 'linear_probe') + METRICS       # of the --correlate CSV

def read_table(path):
    """CSV -> {column: list}; 'encoder' stays text, other cells become finite floats (an empty cell
    is None). Columns: COLUMNS, each at most once; one row per encoder."""
    try:
        # utf-8-sig: UTF-8, with or without the byte order mark that spreadsheets write
        with open(path, newline='', encoding='utf-8-sig') as f:
            # Blank lines are skipped; an empty file gives an empty header and no rows.
            header, *rows = [[cell.strip() for cell in r] for r in csv.reader(f) if r] or [[]]
    except OSError as e:
        fail(f"--correlate {path}: cannot read it ({e.strerror})")
    except UnicodeDecodeError:
        fail(f"--correlate {path}: is not UTF-8 text; save it as UTF-8 CSV")
    if unknown := [c for c in header if c not in COLUMNS]:
        fail(f"--correlate {path}: unknown column(s) {', '.join(unknown)}; "
             f"the columns are {','.join(COLUMNS)}")
    if twice := sorted({c for c in header if header.count(c) > 1}):
        fail(f"--correlate {path}: column {', '.join(twice)} appears twice")
    if not rows or not {'encoder', 'fid'} <= set(header):
        fail(f"--correlate {path}: need a header with at least the columns encoder,fid "
             f"and one row per encoder")
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            fail(f"--correlate {path}: line {line} has {len(row)} cells, the header {len(header)}")
        for c, cell in zip(header, row):
            if (c != 'encoder' and cell
                    and not re.fullmatch(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?', cell)):
                fail(f"--correlate {path}: line {line}, column {c}: "
                     f"'{cell}' is not a finite number")
    encoders = [row[header.index('encoder')] for row in rows]
    if twice := sorted({e for e in encoders if encoders.count(e) > 1}):
        fail(f"--correlate {path}: encoder {', '.join(twice)} has more than one row; keep one")
    return {c: [v if c == 'encoder' else float(v) if v else None for v in col]
            for c, col in zip(header, zip(*rows))}

# -----------------------------------------------------------------------------
# 3. Pictures, drawn with pillow: similarity maps (paper Fig. 6b / 16) and scatter plots (Fig. 4),
#    as titled panels

PANEL = 256                         # side of a panel (px)
STRIP = 20                          # height of the text strip (px)

def colormap(v):
    """Values in [0, 1] (array of any shape) -> uint8 RGB along a 5-stop approximation of
    viridis."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                     dtype=np.float64)
    v = np.clip(np.nan_to_num(np.asarray(v, dtype=np.float64)), 0, 1) * (len(stops) - 1)
    rgb = np.stack([np.interp(v, np.arange(len(stops)), stops[:, c]) for c in range(3)], -1)
    return rgb.astype(np.uint8)

def figure(panels, footer=0):
    """[(title, PIL image)] side by side, each title in a strip above, `footer` px of white below
    -> (fig, its draw)."""
    w, h = panels[0][1].size
    fig = Image.new('RGB', (w * len(panels), STRIP + h + footer), 'white')
    draw = ImageDraw.Draw(fig)
    for i, (title, im) in enumerate(panels):
        fig.paste(im, (i * w, STRIP))
        draw.text((i * w + 4, 5), title, fill='black')
    return fig, draw

def similarity_figure(img, maps, anchor):
    """img (S, S, 3) uint8 | one panel per {title: (H, W) cosine map}, nearest-upsampled, anchor
    token boxed in red, with a colour bar: scale [0, 1] as in the paper (negative cosines show as
    0). ((1 + len(maps)) * 256, 256 + 40)."""
    cell = PANEL / next(iter(maps.values())).shape[0]
    panels = [('image', Image.fromarray(img).resize((PANEL, PANEL), Image.BICUBIC))]
    panels += [(title, Image.fromarray(colormap(m)).resize((PANEL, PANEL), Image.NEAREST))
               for title, m in maps.items()]
    y0, x0 = anchor[0] * cell, anchor[1] * cell
    for _, im in panels:
        ImageDraw.Draw(im).rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline='red', width=2)
    fig, draw = figure(panels, footer=STRIP)
    # the colour bar, cos 0 .. 1
    bar = np.repeat(colormap(np.linspace(0, 1, PANEL - 60))[None], STRIP // 2, axis=0)
    fig.paste(Image.fromarray(bar), (PANEL + 30, PANEL + STRIP + 5))
    draw.text((PANEL + 4, PANEL + STRIP + 4), 'cos 0', fill='black')
    draw.text((2 * PANEL - 26, PANEL + STRIP + 4), '1', fill='black')
    return fig

def scatter(xs, ys, labels, xlabel, size=360, ylabel='gFID', spread=None, ref=None):
    """ylabel (y) against one column (x), each point labelled, with the least-squares line:
    a (size, size - 20) panel. Tick labels at the data's min, middle and max. Optional: spread, a
    (lo, hi) bar per point (e.g. the range over seeds); ref, a (y, label) dashed horizontal line."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    im = Image.new('RGB', (size, size - STRIP), 'white')
    draw = ImageDraw.Draw(im)
    left, top, right, bottom = 50, 10, size - 15, size - STRIP - 40     # the plotting box
    # The axes span the data's range (bars and line included) widened by 10% of it on each side
    # (by 0.1 if the range is 0).
    spread = [] if spread is None else spread
    yall = np.concatenate([ys, np.ravel(spread), [ref[0]] if ref else []])
    (x0, x1), (y0, y1) = [(v.min() - 0.1 * (np.ptp(v) or 1), v.max() + 0.1 * (np.ptp(v) or 1))
                          for v in (xs, yall)]
    px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
    py = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)
    draw.rectangle([left, top, right, bottom], outline='black')
    for u, v in zip(np.linspace(xs.min(), xs.max(), 3), np.linspace(yall.min(), yall.max(), 3)):
        draw.text((px(u) - 12, bottom + 6), f"{u:.3g}", fill='black')
        draw.text((4, py(v) - 5), f"{v:.3g}", fill='black')
    if ref:
        for x in range(left, right, 8):
            draw.line([x, py(ref[0]), min(x + 4, right), py(ref[0])], fill=(120, 120, 120))
        w = draw.textlength(ref[1])
        draw.text((right - 6 - w, py(ref[0]) + 2), ref[1], fill=(120, 120, 120))
    if np.ptp(xs) > 0:
        b, a = np.polyfit(xs, ys, 1)
        draw.line([px(xs.min()), py(a + b * xs.min()), px(xs.max()), py(a + b * xs.max())],
                  fill=(150, 150, 150))
    for x, (lo, hi) in zip(xs, spread):
        draw.line([px(x), py(lo), px(x), py(hi)], fill=(31, 119, 180))
    for x, y, name in zip(xs, ys, labels):
        draw.ellipse([px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3], fill=(31, 119, 180))
        # The label goes right of the point, or left of it near the right edge.
        w = draw.textlength(name)
        label_x = px(x) + 5 if px(x) + 5 + w < right else px(x) - 5 - w
        draw.text((label_x, py(y) - 12), name, fill='black')
    draw.text(((left + right) // 2 - 3 * len(xlabel), bottom + 22), xlabel, fill='black')
    draw.text((left + 4, top + 4), ylabel, fill='black')
    return im

def correlation_figure(table, results, target='fid'):
    """One scatter panel per correlated column, side by side: (360 * len(results), 360)."""
    panels = []
    for col, (n, r, p, rho, _) in results.items():
        rows = [(a, b, e) for a, b, e in zip(table[col], table[target], table['encoder'])
                if None not in (a, b)]
        title = f"{col.upper()}: pearson r={r:.3f}, spearman {rho:.3f}"
        panels.append((title, scatter(*zip(*rows), col)))
    return figure(panels)[0]

# -----------------------------------------------------------------------------
# 4. Features: the encoders' patch tokens, and SiT's hidden state at the alignment layer (Fig. 6c)

def mask_to_grid(mask, grid):
    """A mask image at the image's own size -> (T,) bool on the token grid: any object pixel in a
    patch marks the token (max-pool of mask > 0 at full resolution, so thin objects survive), as
    the official metrics code does for its 256 px masks; a non-square mask first gets the image's
    ADM crop (its central square), so both stay aligned."""
    (W, H), s = mask.size, min(mask.size)
    # the crop the image gets
    left, top = (W - s) // 2, (H - s) // 2
    crop = mask.convert('L').crop((left, top, left + s, top + s))
    m = torch.from_numpy(np.array(crop) > 0)                                    # (s, s)
    return F.adaptive_max_pool2d(m[None, None].float(), grid).flatten().bool()  # (T,) raster order

def keep_masks(masks, min_tokens=None):
    """The official image filter for SRSS: an image counts only with at least `min_tokens` object
    tokens and as many background tokens (default T / 4: 64 of 256 at 16x16, the official value).
    -> (N,) bool."""
    min_tokens = masks.shape[1] // 4 if min_tokens is None else min_tokens
    fg = masks.sum(1)
    return (fg >= min_tokens) & (masks.shape[1] - fg >= min_tokens)

def load_masks(args, dataset, indices, grid):
    """<masks>/<class>/<image stem>.png of each image, resized to it (nearest), on the token grid,
    then the official filter. -> (the indices kept, their (N, T) bool masks, [(path, why)] of the
    images whose header is unreadable; one that only fails to decode, the loader skips)."""
    paths = [dataset.samples[i][0] for i in indices]
    # <class>/<image stem> of each image
    stems = [os.path.splitext(os.path.relpath(p, args.data_path))[0] for p in paths]
    mpaths = [os.path.join(args.masks, stem + '.png') for stem in stems]
    if missing := [m for m in mpaths if not os.path.isfile(m)]:
        fail(f"{len(missing)} of {len(indices)} images have no mask, e.g. {missing[0]} "
             f"(expected <masks>/<class>/<stem>.png)")
    masks, read, unreadable = [], [], []
    for i, path, mpath in zip(indices, paths, mpaths):
        try:
            with Image.open(path) as im:            # the header: the size, nothing decoded
                size = im.size
        except Exception as e:
            unreadable.append((path, f"{type(e).__name__}: {e}"))
            continue
        try:
            with Image.open(mpath) as m:
                masks.append(mask_to_grid(m.resize(size, Image.NEAREST), grid))
        except OSError as e:
            fail(f"cannot read the mask {mpath} ({e})")
        read.append(i)
    if not read:
        fail(f"none of the {len(indices)} images chosen from {args.data_path} is readable")
    masks = torch.stack(masks)
    keep = keep_masks(masks)
    need = masks.shape[1] // 4                                  # keep_masks' default min_tokens
    print(f"{int(keep.sum())} of {len(read)} images have >= {need} object and background tokens "
          f"(the official filter for SRSS); measuring those")
    if not keep.any():
        fail(f"no image has >= {need} object and background tokens in its mask "
             f"(the official filter)")
    return [i for i, k in zip(read, keep.tolist()) if k], masks[keep], unreadable

@torch.no_grad()
def measure(args, encoder_name, device):
    """Per-image metrics {row: {metric: (N,) array}} of the encoder's tokens, raw and after spatial
    normalisation, and with --ckpt of SiT's hidden state h after block encoder_depth and its
    projection, at noise level --t. encoder_name None: the checkpoint's encoder with --ckpt, else
    dinov2_vitb14."""
    model, ck = call_or_fail(trained.load_sit, args.ckpt, device) if args.ckpt else (None, {})
    # A latent SiT's input is made by the VAE.
    sd_vae = call_or_fail(vae.SDVAE, device) if ck.get('vae') else None
    encoder_name = encoder_name or (ck.get('encoder', 'none') if model else 'dinov2_vitb14')
    size, grid = (ck['image_size'], model.grid_size) if model else (args.image_size, args.grid_size)
    for flag, given, own in (('image size', args.image_size, size), ('grid size', args.grid_size, grid)):
        if given not in (None, own):            # None: not given (main() resolves it without --ckpt)
            fail(f"--{flag.replace(' ', '-')} {given}: with --ckpt the checkpoint's {flag} ({own}) "
                 f"is used; drop the flag")
    dataset = call_or_fail(data.ImageFolder, args.data_path, size)
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
    indices = perm[:args.num_images].tolist()
    if args.masks:
        indices, masks, unreadable = load_masks(args, dataset, indices, grid)
    else:
        masks, unreadable = None, []
    encoder = None
    if encoder_name != 'none':
        encoder = call_or_fail(irepa.load_encoder, encoder_name, grid,
                               args.hub_dir or ck.get('hub_dir'), device)
    # SiT is given the images' classes when they are the checkpoint's, else the null (CFG) class.
    same_classes = model is not None and dataset.classes == ck.get('class_names')
    # An unreadable image is skipped (and named), not replaced by another in its slot.
    loader = torch.utils.data.DataLoader(data.Flagged(dataset, indices),
                                         batch_size=args.batch_size, num_workers=args.num_workers)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    vals = {}
    # m: this batch's masks or None
    batch_masks = [None] * len(loader) if masks is None else masks.split(args.batch_size)
    for (img, y, bad, why), m in zip(loader, batch_masks):
        unreadable += [(dataset.samples[int(i)][0], w) for i, w in zip(bad, why) if i >= 0]
        ok = bad < 0
        if not ok.any():
            continue
        img, y, m = img[ok].to(device), y[ok].to(device), None if m is None else m[ok]
        rows = {}
        if encoder is not None:
            with irepa.autocast(device):
                z = encoder(img.float()).float()                      # (B, T, D_enc), input 0..255
            rows[f"{encoder_name} raw"] = z
            z_norm = irepa.spatial_norm(z, args.spnorm_gamma)
            rows[f"{encoder_name} spatial norm (gamma {args.spnorm_gamma})"] = z_norm
        if model is not None:
            # SiT (or the VAE) sees [-1, 1]. h is (B, T, D), its projection h_proj (B, T, D_enc).
            y_sit = y if same_classes else torch.full_like(y, model.num_classes)
            h, h_proj = trained.noised_features(model, img.float() / 127.5 - 1, y_sit, args.t, gen,
                                              sd_vae)
            rows[f"SiT h (block {model.encoder_depth}, t={args.t})"] = h
            if h_proj is not None:
                rows[f"SiT projector(h) ({ck.get('projector', 'mlp')})"] = h_proj
        for name, feats in rows.items():
            for k, v in call_or_fail(all_metrics, feats, m).items():
                vals.setdefault(name, {}).setdefault(k, []).append(v.double().cpu().numpy())
    if unreadable:
        warn(f"skipped {len(unreadable)} unreadable image(s), the first {unreadable[0][0]} "
             f"({unreadable[0][1]})")
    if not vals:
        fail(f"none of the {len(indices)} images chosen from {args.data_path} is readable")
    if model is not None and not same_classes:
        print("note: the image folder's classes differ from the checkpoint's, "
              "so SiT was given the null class")
    return {name: {k: np.concatenate(v) for k, v in ms.items()} for name, ms in vals.items()}

@torch.no_grad()
def visualise(args, device):
    """image | cos(anchor, token) map of the raw tokens | of the spatially normalised tokens
    (paper Fig. 6b / 16)."""
    try:
        with Image.open(args.viz) as im:
            img = data.center_crop_arr(data.to_rgb(im), args.image_size)          # (S, S, 3) uint8
    except OSError as e:
        fail(f"--viz {args.viz}: cannot read the image ({e})")
    H = args.grid_size
    out = args.out or 'similarity.png'
    r, c = args.anchor or (H // 2, H // 2)
    if not (0 <= r < H and 0 <= c < H):
        fail(f"--anchor {r} {c} is outside the {H}x{H} token grid")
    encoder = call_or_fail(irepa.load_encoder, args.encoder or 'dinov2_vitb14', H, args.hub_dir,
                           device)
    with irepa.autocast(device):
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float().to(device)        # (1, 3, S, S)
        z = encoder(x).float()                                                     # (1, T, D)
    maps = {'raw tokens': z,
            f'spatial norm, gamma {args.spnorm_gamma}': irepa.spatial_norm(z, args.spnorm_gamma)}
    # each map: every token's cosine to the anchor token, on the H x H grid
    maps = {t: cosine_gram(u)[0][0, r * H + c].view(H, H).cpu().numpy() for t, u in maps.items()}
    similarity_figure(img, maps, (r, c)).save(out)
    print(f"wrote {out}: anchor token (row {r}, col {c}) of the {H}x{H} grid")
    return out

# -----------------------------------------------------------------------------
# 5. Command line

def print_table(vals, data_path):
    n = len(next(iter(vals.values()))['lds'])
    print(f"spatial structure metrics over {n} images from {data_path}")
    print(f"{'features':<44}" + ''.join(f"{m.upper():>20}" for m in METRICS))
    for name, ms in vals.items():
        cells = ['{:.4f} +- {:.4f}'.format(*mean_ci(ms[k])) if k in ms else 'n/a' for k in METRICS]
        print(f"{name:<44}" + ''.join(f"{cell:>20}" for cell in cells))
    print("(mean +- half-width of the 95% confidence interval over images; SRSS needs --masks)")

def run_correlation(args, device):
    """Paper Fig. 4: each metric (and linear probing) against gFID across encoders; a table and a
    scatter PNG."""
    table = read_table(args.correlate)
    out = args.out or 'correlation.png'
    todo = [m for m in METRICS if m not in table and (m != 'srss' or args.masks)]
    if todo and args.data_path:                             # measure the missing columns
        if bad := [e for e in table['encoder'] if e not in irepa.ENCODERS]:
            fail(f"cannot measure encoder(s) {', '.join(bad)}: not in irepa.ENCODERS; "
                 f"put their metric values in the CSV")
        raws = [measure(args, enc, device)[f"{enc} raw"] for enc in table['encoder']]
        table.update({m: [mean_ci(raw[m])[0] for raw in raws] for m in todo})
    if not (results := correlate(table)):
        fail("nothing to correlate: need >= 3 rows with fid and a linear_probe or metric column "
             "(or pass --data-path to measure the metrics)")
    print(f"{'encoder':<24}{'fid':>10}" + ''.join(f"{c:>14}" for c in results))
    for enc, fid, *cells in zip(table['encoder'], table['fid'], *(table[c] for c in results)):
        print(f"{enc:<24}{fid!s:>10}"
              + ''.join(f"{'-' if v is None else f'{v:.4f}':>14}" for v in cells))
    print(f"\n{'vs fid':<14}{'n':>4}{'pearson r':>12}{'p':>11}{'spearman':>12}{'p':>11}")
    for col, (n, r, p, rho, p_rho) in results.items():
        print(f"{col:<14}{n:>4}{r:>12.3f}{p:>11.2e}{rho:>12.3f}{p_rho:>11.2e}")
    correlation_figure(table, results).save(out)
    print(f"wrote {out}")
    return results

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-path', default=None, help="root/<class>/<image>")
    p.add_argument('--encoder', choices=irepa.ENCODERS,
                   help="default: the --ckpt's encoder, else dinov2_vitb14")
    p.add_argument('--hub-dir', default=None,
                   help="local torch.hub folder (with hubconf.py), for offline DINOv2/v3/v1")
    p.add_argument('--image-size', type=int, default=None,
                   help="default 256 (the paper's); with --ckpt the checkpoint's")
    p.add_argument('--grid-size', type=int, default=None,
                   help="token grid side, default 16 (the paper's 16x16 at 256 px); "
                        "with --ckpt the checkpoint's")
    p.add_argument('--num-images', type=int, default=1000)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--masks', default=None, help="folder of object masks, for SRSS")
    p.add_argument('--spnorm-gamma', type=float, default=0.6,
                   help="iREPA gamma (paper range 0.6-0.8)")
    p.add_argument('--ckpt', default=None,
                   help="an irepa.py or official checkpoint (or run folder): SiT's features")
    p.add_argument('--t', type=float, default=None,
                   help="noise level of x_t for --ckpt (t=0 data, t=1 noise), default 0.5")
    p.add_argument('--correlate', default=None,
                   help="CSV: encoder,fid[,linear_probe,lds,cds,srss,rmsc]")
    p.add_argument('--viz', default=None,
                   help="an image: plot cosine-similarity maps of one anchor token")
    p.add_argument('--anchor', type=int, nargs=2, default=None, metavar=('ROW', 'COL'),
                   help="the --viz anchor token, default: grid centre")
    p.add_argument('--out', default=None,
                   help="the .png to write (--viz: similarity.png, --correlate: correlation.png)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--num-workers', type=int, default=4)
    return p.parse_args(argv)

def main(argv=None):
    args = get_args(argv)
    check_not_empty(args, ('data_path', 'masks', 'ckpt', 'correlate', 'viz', 'hub_dir', 'out'))
    # grid_size >= 2: one token has no spatial structure (and its spatial norm would be 0 / 0)
    check_ranges(args, dict(image_size=1, grid_size=2, num_images=1, batch_size=1, t=(0, 1),
                                  num_workers=0, spnorm_gamma=(0, 1), seed=0))
    folder = os.path.dirname(os.path.abspath(args.out or '.'))
    if args.out and (os.path.isdir(args.out) or not os.path.isdir(folder)
                     or not os.access(folder, os.W_OK)):
        fail(f"--out {args.out}: not a writable file path (a PNG in an existing, writable folder)")
    if args.out and not args.out.lower().endswith('.png'):
        fail(f"--out {args.out}: the figure is a PNG; give a path ending in .png")
    # A flag that the chosen mode would ignore is an error, not a surprise afterwards.
    if args.out and not (args.viz or args.correlate):
        fail("--out is for the figures of --viz and --correlate; the table mode only prints")
    if args.t is not None and not args.ckpt:
        fail("--t is the noise level of SiT's input: it needs --ckpt")
    if args.anchor and not args.viz:
        fail("--anchor picks the token of the --viz figure: it needs --viz")
    if args.viz and args.correlate:
        fail("--viz and --correlate are two modes; pass one of them")
    if args.ckpt and (args.viz or args.correlate):
        fail("--ckpt is for the table of SiT's features; --viz and --correlate look at encoders")
    # The defaults; with --ckpt, size and grid are the checkpoint's (measure() checks given ones).
    if not args.ckpt:
        args.image_size, args.grid_size = args.image_size or 256, args.grid_size or 16
    args.t = 0.5 if args.t is None else args.t
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if args.viz:
        return visualise(args, device)
    if args.correlate:
        return run_correlation(args, device)
    if not args.data_path:
        fail("pass --data-path (root/<class>/<image>), or use --correlate CSV / --viz IMAGE")
    vals = measure(args, args.encoder, device)
    print_table(vals, args.data_path)
    return vals

if __name__ == '__main__':
    main()
