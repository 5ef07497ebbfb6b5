"""Tests for metrics.py: analytic token grids, a brute-force pairwise reference, correlation, pictures, the CLI."""
import csv
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

import irepa
import metrics


def column_onehot(B, H):
    """Token (r, c) is the one-hot vector e_c: cos = 1 within a column, 0 across columns. (B, H*H, H)."""
    return torch.eye(H, dtype=torch.float64)[torch.arange(H).repeat(H)].expand(B, -1, -1).clone()


def test_constant_features_have_no_structure():
    x = torch.randn(1, 1, 5).expand(2, 64, 5)                                   # every token the same
    for f in (metrics.lds, metrics.cds, metrics.rmsc):
        assert torch.allclose(f(x), torch.zeros(2), atol=1e-6)


def test_column_onehot_hand_computed():
    # 4x4 grid. Ordered pairs with |dr| = a, |dc| = b: m(a) m(b), m(0) = 4, m(k) = 2 (4 - k) = 6, 4, 2.
    x = column_onehot(2, 4)
    # LDS(near 1, far 3): near = 24 vertical (cos 1) + 24 horizontal (cos 0) -> 1/2;
    # far (a + b >= 3) = 124 pairs, of which same column (a = 3, b = 0): 8 -> 8/124 = 2/31.
    assert torch.allclose(metrics.lds(x, near_dist=1, far_dist=3), torch.full((2,), 0.5 - 2 / 31, dtype=torch.float64))
    # CDS(dmax 3): g(1) = 24/48, g(2) = 16/68, g(3) = 8/64; for d = 1, 2, 3 the LS slope is (g3 - g1) / 2.
    assert torch.allclose(metrics.cds(x, dmax=3), torch.full((2,), -(1 / 8 - 1 / 2) / 2, dtype=torch.float64))
    # RMSC: mean token = (1/4, ..., 1/4), ||e_c - mean||^2 = 1 - 1/4.
    assert torch.allclose(metrics.rmsc(x), torch.full((2,), math.sqrt(3 / 4), dtype=torch.float64))
    # SRSS with the left two columns as the object (d_pos 1, d_neg 3): negatives are other columns (cos 0);
    # positives: vertical neighbours (cos 1, one at the top/bottom row, two inside) + one horizontal (cos 0).
    # Anchors: rows 0, 3 -> 1/2, rows 1, 2 -> 2/3; mean 7/12.
    mask = (torch.arange(16) % 4 < 2).expand(2, -1)
    assert torch.allclose(metrics.srss(x, mask, d_pos=1, d_neg=3), torch.full((2,), 7 / 12, dtype=torch.float64))


def test_smooth_ramp_decays():
    # features rotate with the column: cos between columns c, c' is cos((c - c') * 0.2); no change down a column
    H = 8
    ang = 0.2 * torch.arange(H, dtype=torch.float64).repeat(H)
    x = torch.stack([ang.cos(), ang.sin()], -1)[None]                           # (1, 64, 2)
    assert metrics.lds(x).item() > 0 and metrics.cds(x).item() > 0
    # RMSC = sqrt(1 - ||mean unit vector||^2)
    mean_vec = torch.stack([ang.cos().mean(), ang.sin().mean()])
    assert metrics.rmsc(x).item() == pytest.approx(math.sqrt(1 - mean_vec.pow(2).sum().item()), rel=1e-9)


def brute_force(x, masks, near, far, dmax, d_pos, d_neg):
    """Loops over token pairs, float64: (lds, cds, srss, rmsc) of one image x (T, D)."""
    T = len(x)
    H = math.isqrt(T)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    pos = [(t // H, t % H) for t in range(T)]
    dist = lambda i, j: abs(pos[i][0] - pos[j][0]) + abs(pos[i][1] - pos[j][1])
    cos = lambda i, j: float(u[i] @ u[j])
    pairs = [(i, j) for i in range(T) for j in range(T) if i != j]
    near_v = [cos(i, j) for i, j in pairs if dist(i, j) <= near]
    far_v = [cos(i, j) for i, j in pairs if dist(i, j) >= far]
    ds = [d for d in range(1, dmax + 1) if any(dist(i, j) == d for i, j in pairs)]
    g = [np.mean([cos(i, j) for i, j in pairs if dist(i, j) == d]) for d in ds]
    slope = np.polyfit(ds, g, 1)[0]
    deltas = []
    for a in range(T):
        if not masks[a]:
            continue
        p = [cos(a, j) for j in range(T) if j != a and masks[j] and dist(a, j) <= d_pos]
        n = [cos(a, j) for j in range(T) if not masks[j] and dist(a, j) >= d_neg]
        if p and n:
            deltas.append(np.mean(p) - np.mean(n))
    rms = math.sqrt(np.mean(np.sum((u - u.mean(0)) ** 2, axis=1)))
    return np.mean(near_v) - np.mean(far_v), -slope, np.mean(deltas) if deltas else math.nan, rms


@pytest.mark.parametrize('near,far,dmax,d_pos,d_neg', [(1, 6, 8, 1, 6), (2, 3, 4, 2, 3)])
def test_matches_brute_force(near, far, dmax, d_pos, d_neg):
    g = torch.Generator().manual_seed(0)
    H = 6
    x = torch.randn(3, H * H, 5, generator=g, dtype=torch.float64) + 0.5
    masks = torch.rand(3, H * H, generator=g) < 0.5
    masks[2] = True                                                              # all object: SRSS NaN
    got = torch.stack([metrics.lds(x, near, far), metrics.cds(x, dmax), metrics.srss(x, masks, d_pos, d_neg),
                       metrics.rmsc(x)], 1).numpy()
    want = np.array([brute_force(x[b].numpy(), masks[b].numpy(), near, far, dmax, d_pos, d_neg) for b in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)



def test_official_radii_by_hand_with_nothing_passed():
    """The official radii with no argument given: LDS 4-neighbours (d = 1) vs d >= 6, CDS d = 1..8, SRSS positives
    at d = 1 and negatives at d >= 6. Column one-hot tokens on an 8x8 grid (cos 1 within a column, 0 across): the
    ordered pairs at distance d number N(d) = sum_{a + b = d} m(a) m(b), m(0) = 8, m(k) = 2 (8 - k), of which
    8 m(d) share a column (d <= 7)."""
    x = column_onehot(1, 8)
    n_d = np.array([224, 388, 496, 552, 560, 524, 448, 336])                  # N(1..8); all 14 sum to 64 * 63
    same = np.array([112, 96, 80, 64, 48, 32, 16, 0])                        # 8 m(d)
    # LDS: d = 1 gives 112 of 224 in a column; d >= 6 gives 32 + 16 of 4032 - 2220 = 1812 pairs
    assert metrics.lds(x).item() == pytest.approx(1 / 2 - 48 / 1812, rel=1e-12)
    d = np.arange(1, 9)                                                       # CDS: least-squares slope over d = 1..8
    g = same / n_d
    assert metrics.cds(x).item() == pytest.approx(-((d - 4.5) * g).sum() / ((d - 4.5) ** 2).sum(), rel=1e-12)
    assert metrics.rmsc(x).item() == pytest.approx(math.sqrt(7 / 8), rel=1e-12)
    # SRSS, object = the left 4 columns: negatives (other columns) have cos 0, so an anchor scores nv / (nv + nh) with
    # nv = 1 or 2 vertical (cos 1) and nh = 1 or 2 horizontal (cos 0) object neighbours:
    # (4 * 1/2 + 4 * 1/3 + 12 * 2/3 + 12 * 1/2) / 32 = 13/24
    left = (torch.arange(64) % 8 < 4)[None]
    assert metrics.srss(x, left).item() == pytest.approx(13 / 24, rel=1e-12)
    # object = the top 4 rows: background in the anchor's own column is a negative only from 6 rows down
    top = (torch.arange(64) < 32)[None]
    got = metrics.all_metrics(x, top)
    want = brute_force(x[0].numpy(), top[0].numpy(), 1, 6, 8, 1, 6)
    assert [got[k].item() for k in ('lds', 'cds', 'srss', 'rmsc')] == pytest.approx(want, rel=1e-12)
    assert brute_force(x[0].numpy(), top[0].numpy(), 1, 6, 8, 1, 5)[2] != pytest.approx(want[2], rel=1e-3)

def test_paper_lds_variant():
    # paper text: d in (0, H/2) vs d >= H/2
    x = torch.randn(2, 64, 4, dtype=torch.float64)
    H = 8
    want = brute_force(x[0].numpy(), np.zeros(64, bool), H // 2 - 1, H // 2, 8, 1, 6)[0]
    assert metrics.lds(x, near_dist=H // 2 - 1, far_dist=H // 2)[0].item() == pytest.approx(want, rel=1e-9)


def test_srss_nan_without_background_and_float32():
    x = torch.randn(2, 64, 8)
    assert torch.isnan(metrics.srss(x, torch.ones(2, 64, dtype=torch.bool))).all()
    assert torch.isnan(metrics.srss(x, torch.zeros(2, 64))).all()               # no anchors either
    assert metrics.lds(x.half()).dtype == torch.float32                          # half promoted, not computed in fp16


def test_bad_grid_and_masks():
    with pytest.raises(ValueError, match='square'):
        metrics.lds(torch.randn(1, 12, 4))
    with pytest.raises(ValueError, match='no pairs'):
        metrics.lds(torch.randn(1, 9, 4))                                        # 3x3: max distance 4 < 6
    with pytest.raises(ValueError, match='masks'):
        metrics.srss(torch.randn(1, 16, 4), torch.ones(1, 9))


def test_mean_ci():
    v = np.array([1.0, 2.0, 4.0, np.nan])
    mean, hw = metrics.mean_ci(v)
    lo, hi = stats.t.interval(0.95, 2, loc=7 / 3, scale=stats.sem([1.0, 2.0, 4.0]))
    assert mean == pytest.approx(7 / 3) and hw == pytest.approx((hi - lo) / 2)


def test_correlate_matches_scipy():
    table = dict(encoder=list('abcde'), fid=[20.0, 25.0, 19.0, 30.0, 22.0],
                 linear_probe=[0.7, 0.8, 0.5, 0.6, None], lds=[0.3, 0.2, 0.35, 0.1, 0.25])
    res = metrics.correlate(table)
    assert set(res) == {'linear_probe', 'lds'}
    n, r, p, rho, p_rho = res['lds']
    ref_r, ref_p = stats.pearsonr(table['lds'], table['fid'])
    ref_rho, ref_prho = stats.spearmanr(table['lds'], table['fid'])
    assert n == 5 and (r, p, rho, p_rho) == pytest.approx((ref_r, ref_p, ref_rho, ref_prho))
    assert res['linear_probe'][0] == 4                                           # the row without a value is left out
    assert res['linear_probe'][1] == pytest.approx(stats.pearsonr([0.7, 0.8, 0.5, 0.6], [20, 25, 19, 30])[0])


def test_similarity_figure_shows_the_maps_and_the_anchor():
    m = np.random.default_rng(0).random((8, 8)) * 2 - 1                          # cosines in [-1, 1]
    fig = np.array(metrics.similarity_figure(np.zeros((64, 64, 3), np.uint8), {'a': m, 'b': m}, (3, 4)))
    strip, cell = 20, 32                                                          # 256 px panel / 8 tokens
    for panel in (1, 2):                                                          # token centres show colormap(cos)
        centres = fig[strip + cell // 2:strip + 256:cell, panel * 256 + cell // 2:(panel + 1) * 256:cell]
        want = metrics.colormap(np.clip(m, 0, 1))
        want[3, 4] = centres[3, 4]                                                # the boxed token's centre is free
        assert (centres == want).all()
    for panel in (0, 1, 2):                                                       # red box on the anchor, row 3 col 4
        x0, y0 = panel * 256 + 4 * cell, strip + 3 * cell
        assert tuple(fig[y0 + 10, x0]) == (255, 0, 0) and tuple(fig[y0, x0 + 10]) == (255, 0, 0)
        assert tuple(fig[y0 + 10, x0 - cell]) != (255, 0, 0)


def test_scatter_puts_each_encoder_where_its_values_say():
    xs, ys = [0.1, 0.2, 0.4], [9.0, 3.0, 6.0]                                    # a metric and gFID
    im = np.array(metrics.scatter(xs, ys, ['', '', ''], 'lds'))
    blue = np.argwhere((im == (31, 119, 180)).all(-1))                            # (row, col) of the dots' pixels
    blue = blue[np.argsort(blue[:, 1])]
    dots = np.split(blue, np.nonzero(np.diff(blue[:, 1]) > 5)[0] + 1)             # split at gaps along x
    centres = [d.mean(0) for d in dots]
    assert len(centres) == 3
    (r0, c0), (r1, c1), (r2, c2) = centres
    assert abs((c1 - c0) * 2 - (c2 - c1)) < 2                                     # x spacing follows 0.1 : 0.2 : 0.4
    assert r1 > r2 > r0 and abs((r1 - r0) - 2 * (r1 - r2)) < 2                    # gFID up = row up; 6 : 3 spacing
    assert ((im == (150, 150, 150)).all(-1)).sum() > 100                          # the least-squares line is drawn



def test_scatter_draws_spread_bars_and_the_reference_line():
    xs, ys = [0.1, 0.2, 0.4], [9.0, 3.0, 6.0]
    im = np.array(metrics.scatter(xs, ys, ['', '', ''], 'lds', spread=[(8.0, 11.0), (3.0, 3.0), (6.0, 6.0)],
                                  ref=(5.0, '')))
    blue = np.argwhere((im == (31, 119, 180)).all(-1))
    blue = blue[np.argsort(blue[:, 1])]
    bar, dot3, dot6 = np.split(blue, np.nonzero(np.diff(blue[:, 1]) > 5)[0] + 1)
    row = lambda y: dot3[:, 0].mean() + (y - 3) * (dot6[:, 0].mean() - dot3[:, 0].mean()) / 3   # y -> pixel row
    assert abs(bar[:, 0].min() - row(11)) < 1.5 and abs(bar[:, 0].max() - row(8)) < 1.5     # the bar spans 8..11
    grey = np.argwhere((im == (120, 120, 120)).all(-1))                          # the dashed line at y = 5
    assert len(grey) > 100 and abs(np.bincount(grey[:, 0]).argmax() - row(5)) < 1.5


def test_pictures_have_the_right_size():
    fig = metrics.similarity_figure(np.zeros((64, 64, 3), np.uint8), {'raw': np.random.rand(8, 8),
                                                                     'norm': np.random.rand(8, 8) * 2 - 1}, (3, 4))
    assert fig.size == (3 * 256, 256 + 40)
    table = dict(encoder=['a', 'b', 'c'], fid=[1.0, 2.0, 3.0], lds=[0.3, 0.2, 0.1], rmsc=[0.5, 0.4, 0.45])
    assert metrics.correlation_figure(table, metrics.correlate(table)).size == (2 * 360, 360)


# -----------------------------------------------------------------------------
# The command line, with irepa's weight-free HOG encoder (no download)

def make_folder(root, n=6, size=64):
    rng = np.random.default_rng(0)
    for i in range(n):
        os.makedirs(root / f"c{i % 2}", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def make_masks(data, root):
    for p in data.rglob('*.png'):
        rel = p.relative_to(data)
        os.makedirs(root / rel.parent, exist_ok=True)
        m = np.zeros((64, 72), np.uint8)
        m[16:48, 20:52] = 1                                                      # a 0/1 mask: nonzero = object
        Image.fromarray(m).save(root / rel)
    return root


COMMON = ['--encoder', 'hog', '--image-size', '64', '--grid-size', '8', '--num-workers', '0', '--batch-size', '4']


def test_cli_encoder_table(tmp_path, capsys):
    data = make_folder(tmp_path / 'data')
    masks = make_masks(data, tmp_path / 'masks')
    vals = metrics.main(['--data-path', str(data), '--masks', str(masks), '--num-images', '5'] + COMMON)
    out = capsys.readouterr().out
    assert 'hog raw' in out and 'spatial norm (gamma 0.6)' in out and 'over 5 images' in out
    assert set(vals) == {'hog raw', 'hog spatial norm (gamma 0.6)'}
    assert set(vals['hog raw']) == set(metrics.METRICS)
    assert all(len(v) == 5 for ms in vals.values() for v in ms.values())


def test_cli_skips_an_unreadable_image_without_filling_its_slot(tmp_path, capsys):
    """A corrupt file is named and left out: the table is over the 5 readable images, the same values as the folder
    without it (no other image measured twice in its place); a folder with none readable gives one line."""
    data = make_folder(tmp_path / 'data')
    (data / 'c1' / '3.png').write_bytes(b'not a png')
    vals = metrics.main(['--data-path', str(data)] + COMMON)
    out, err = capsys.readouterr()
    assert 'over 5 images' in out and 'skipped 1 unreadable image(s), the first ' + str(data / 'c1' / '3.png') in err
    os.remove(data / 'c1' / '3.png')
    clean = metrics.main(['--data-path', str(data)] + COMMON)
    for name in clean:
        for k in clean[name]:
            np.testing.assert_allclose(np.sort(vals[name][k]), np.sort(clean[name][k]), rtol=1e-4, atol=1e-6,
                                       err_msg=k)                               # batches differ: float order
    for p in data.rglob('*.png'):
        p.write_bytes(b'')
    with pytest.raises(SystemExit, match='none of the 5 images chosen from .* is readable'):
        metrics.main(['--data-path', str(data)] + COMMON)


def test_cli_mask_and_folder_errors(tmp_path):
    data = make_folder(tmp_path / 'data')
    masks = make_masks(data, tmp_path / 'masks')
    os.remove(masks / 'c0' / '0.png')
    with pytest.raises(SystemExit, match='1 of 6 images have no mask'):
        metrics.main(['--data-path', str(data), '--masks', str(masks)] + COMMON)
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(SystemExit, match='no images'):
        metrics.main(['--data-path', str(tmp_path / 'empty')] + COMMON)
    with pytest.raises(SystemExit, match='--data-path'):
        metrics.main(COMMON)


def test_cli_checkpoint_features(tmp_path, capsys):
    args = dict(model='SiT-T/4', image_size=32, input_size=32, in_channels=3, num_classes=2, class_names=['c0', 'c1'],
                encoder='hog', encoder_depth=2, target_dim=36, projector='conv', pred='v')
    model = irepa.build_model(args)
    os.makedirs(tmp_path / 'run' / 'checkpoints')
    torch.save(dict(ema=model.state_dict(), args=args), tmp_path / 'run' / 'checkpoints' / '0000010.pt')
    data = make_folder(tmp_path / 'data')
    vals = metrics.main(['--ckpt', str(tmp_path / 'run'), '--data-path', str(data), '--t', '0.3',
                         '--num-workers', '0', '--num-images', '4'])
    assert set(vals) == {'hog raw', 'hog spatial norm (gamma 0.6)', 'SiT h (block 2, t=0.3)', 'SiT projector(h) (conv)'}
    assert 'null class' not in capsys.readouterr().out                         # class names match: real labels


def test_cli_correlate(tmp_path, capsys):
    path = tmp_path / 'enc.csv'
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['encoder', 'fid', 'linear_probe', 'lds', 'cds', 'rmsc'])
        for row in [('a', 19.1, 0.8, 0.30, 0.02, 0.6), ('b', 26.1, 0.76, 0.18, 0.01, 0.5),
                    ('c', 32.3, 0.83, 0.08, 0.005, 0.4), ('d', 21.0, 0.53, 0.34, 0.03, 0.65)]:
            w.writerow(row)
    out_png = tmp_path / 'fig4.png'
    res = metrics.main(['--correlate', str(path), '--out', str(out_png)])
    assert res['lds'][1] == pytest.approx(stats.pearsonr([0.30, 0.18, 0.08, 0.34], [19.1, 26.1, 32.3, 21.0])[0])
    assert 'spearman' in capsys.readouterr().out
    assert Image.open(out_png).size == (4 * 360, 360)


def test_cli_viz(tmp_path):
    img = make_folder(tmp_path / 'data', n=1) / 'c0' / '0.png'
    out = tmp_path / 'viz.png'
    metrics.main(['--viz', str(img), '--anchor', '2', '5', '--out', str(out)] + COMMON)
    assert Image.open(out).size == (3 * 256, 256 + 40)
    with pytest.raises(SystemExit, match='outside'):
        metrics.main(['--viz', str(img), '--anchor', '9', '0'] + COMMON)


def test_cli_correlate_measures_missing_columns(tmp_path, monkeypatch, capsys):
    # two stand-in encoders beside HOG: sin-cos position codes (smooth in space) and random tokens (no structure)
    class Stub(torch.nn.Module):
        def __init__(self, name, grid):
            super().__init__()
            self.name, self.grid = name, grid

        def forward(self, img):
            if self.name == 'pos':
                return torch.from_numpy(irepa.sincos_2d(16, self.grid)).float().expand(len(img), -1, -1)
            return torch.randn(len(img), self.grid ** 2, 8, generator=torch.Generator().manual_seed(0))
    real = irepa.load_encoder
    monkeypatch.setattr(irepa, 'ENCODERS', irepa.ENCODERS + ('pos', 'noise'))
    monkeypatch.setattr(irepa, 'load_encoder', lambda name, grid, hub=None, device='cpu':
                        Stub(name, grid) if name in ('pos', 'noise') else real(name, grid, hub, device))
    path = tmp_path / 'enc.csv'
    path.write_text('encoder,fid\nhog,20\npos,18\nnoise,40\n')
    data = make_folder(tmp_path / 'data')
    args = ['--data-path', str(data), '--num-images', '4', '--image-size', '64', '--grid-size', '8',
            '--num-workers', '0']
    res = metrics.main(['--correlate', str(path), '--out', str(tmp_path / 'c.png')] + args)
    assert set(res) == {'lds', 'cds', 'rmsc'} and all(v[0] == 3 for v in res.values())
    table = capsys.readouterr().out
    hog = metrics.main(['--encoder', 'hog'] + args)['hog raw']                  # the same images, measured directly
    assert f"{hog['lds'].mean():.4f}" in table
    assert res['lds'][1] < 0                                                     # less structure, worse fid


def test_mask_to_grid_keeps_thin_objects_and_follows_the_crop():
    # a 1 px vertical line in a 144 x 128 (W x H) mask: the image's crop keeps columns 8..135; the line at
    # column 80 lies in crop column 72 -> token column 72 // 16 = 4 of an 8 x 8 grid, in every row
    m = np.zeros((128, 144), np.uint8)
    m[:, 80] = 1
    grid = metrics.mask_to_grid(Image.fromarray(m), 8).view(8, 8)
    assert grid[:, 4].all() and grid.sum() == 8
    m = np.zeros((128, 144), np.uint8)
    m[0, 4] = 255                                                                # outside the crop: dropped
    assert not metrics.mask_to_grid(Image.fromarray(m), 8).any()


def test_official_mask_filter():
    masks = torch.zeros(3, 256, dtype=torch.bool)
    masks[0, :64] = True                                                         # 64 object, 192 background: kept
    masks[1, :63] = True                                                         # 63 object: dropped
    masks[2, :200] = True                                                        # 56 background: dropped
    assert metrics.keep_masks(masks).tolist() == [True, False, False]
    assert metrics.keep_masks(masks, min_tokens=10).tolist() == [True, True, True]


def test_cli_srss_uses_only_images_that_pass_the_filter(tmp_path, capsys):
    data = make_folder(tmp_path / 'data')
    masks = make_masks(data, tmp_path / 'masks')
    tiny_obj = np.zeros((64, 72), np.uint8)
    tiny_obj[30:33, 30:33] = 1                                                   # one or two tokens of 64
    Image.fromarray(tiny_obj).save(masks / 'c0' / '0.png')
    vals = metrics.main(['--data-path', str(data), '--masks', str(masks), '--num-images', '6'] + COMMON)
    assert '5 of 6 images' in capsys.readouterr().out
    assert all(len(v) == 5 for ms in vals.values() for v in ms.values())


def test_read_table_parses_numbers_and_keeps_empty_cells_as_none(tmp_path):
    (tmp_path / 't.csv').write_text(' encoder , fid ,lds,cds\n\nd 1, 9.5 ,-1.5e-3,\nd2,+2,.5,3.\n')
    assert metrics.read_table(tmp_path / 't.csv') == {'encoder': ['d 1', 'd2'], 'fid': [9.5, 2.0],
                                                      'lds': [-0.0015, 0.5], 'cds': [None, 3.0]}


@pytest.mark.parametrize('text, msg', [
    ('encoder,fid,lds\na,1.0,0.2\nb,2.0\n', 'line 3 has 2 cells, the header 3'),
    ('encoder,fid,lds\na,1.0,0.2,9\n', 'line 2 has 4 cells, the header 3'),
    ('encoder,fid,lds\na,1.0,high\n', "line 2, column lds: 'high' is not a finite number"),
    ('encoder,fid,lds\na,inf,0.1\n', "line 2, column fid: 'inf' is not a finite number"),
    ('encoder,fid,lds\na,1.0,NaN\n', "line 2, column lds: 'NaN' is not a finite number"),
    ('encoder,fid,lds\na,1.0,1e\n', "line 2, column lds: '1e' is not a finite number"),
    ('encoder,lds\na,0.1\n', 'at least the columns encoder,fid'),
    ('\n\n', 'at least the columns encoder,fid'),
])
def test_malformed_csv_rows_give_one_line_errors(tmp_path, text, msg):
    (tmp_path / 't.csv').write_text(text)
    with pytest.raises(SystemExit) as e:
        metrics.main(['--correlate', str(tmp_path / 't.csv')])
    assert msg in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('extra, msg', [(['--t', '1.5'], '--t must be in [0, 1]'),
                                        (['--num-images', '0'], '--num-images must be >= 1'),
                                        (['--grid-size', '0'], '--grid-size must be >= 2'),
                                        (['--out', '/no/such/dir/x.png'], 'not a writable file path'),
                                        (['--masks', ''], '--masks is empty (an unset shell variable?)')])
def test_metric_flags_are_range_checked(tmp_path, extra, msg):
    with pytest.raises(SystemExit) as e:
        metrics.main(['--data-path', str(tmp_path)] + extra)
    assert msg in str(e.value)


def test_corrupt_mask_is_a_one_line_error(tmp_path):
    data = make_folder(tmp_path / 'data')
    masks = make_masks(data, tmp_path / 'masks')
    (masks / 'c1' / '1.png').write_bytes(b'not a png')
    with pytest.raises(SystemExit) as e:
        metrics.main(['--data-path', str(data), '--masks', str(masks)] + COMMON)
    assert 'cannot read the mask' in str(e.value) and '1.png' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('where', ['header', 'file', 'loader'])
def test_an_unreadable_image_with_masks_is_left_out_with_its_mask(tmp_path, capsys, monkeypatch, where):
    """header: not an image at all, left out when the masks are read; file: a truncated PNG (the header reads,
    decoding fails) and loader: an image only the loader cannot read, left out with its own mask, not another's.
    Either way the table holds the other 5 images, with the values of the folder without it."""
    data = make_folder(tmp_path / 'data')
    masks = make_masks(data, tmp_path / 'masks')
    rng = np.random.default_rng(1)
    for p in sorted(masks.rglob('*.png')):                      # a different object in each mask
        m = np.zeros((64, 72), np.uint8)
        r, c = rng.integers(0, 30, 2)
        m[r:r + 34, c:c + 40] = 1
        Image.fromarray(m).save(p)
    bad = data / 'c1' / '1.png'
    args = ['--data-path', str(data), '--masks', str(masks)] + COMMON
    if where != 'loader':
        bad.write_bytes(b'not a png' if where == 'header' else bad.read_bytes()[:len(bad.read_bytes()) // 2])
        vals = metrics.main(args)
    else:
        load = metrics.data.ImageFolder.load
        def load_but_not(self, path):
            if path == str(bad):
                raise OSError('unreadable now')
            return load(self, path)
        monkeypatch.setattr(metrics.data.ImageFolder, 'load', load_but_not)
        vals = metrics.main(args)
        monkeypatch.undo()
    out, err = capsys.readouterr()
    assert 'skipped 1 unreadable image(s), the first ' + str(bad) in err and 'over 5 images' in out, err
    os.remove(bad)
    os.remove(masks / 'c1' / '1.png')
    clean = metrics.main(args)
    for name in clean:
        for k in clean[name]:
            np.testing.assert_allclose(np.sort(vals[name][k]), np.sort(clean[name][k]), rtol=1e-4, atol=1e-6,
                                       err_msg=k)


def test_a_grid_too_small_for_the_metrics_is_a_one_line_error(tmp_path):
    data = make_folder(tmp_path / 'data')
    with pytest.raises(SystemExit) as e:                                     # 3x3: no pair at distance >= 6
        metrics.main(['--data-path', str(data), '--encoder', 'hog', '--image-size', '48', '--grid-size', '3',
                      '--num-workers', '0'])
    assert 'no pairs at distance' in str(e.value) and '\n' not in str(e.value)


def save_checkpoint(root):
    """A 32 px SiT-T/4 (an 8x8 grid) with HOG as its encoder, saved as an irepa.py run folder -> the folder."""
    args = dict(model='SiT-T/4', image_size=32, input_size=32, in_channels=3, num_classes=2, class_names=['c0', 'c1'],
                encoder='hog', encoder_depth=2, target_dim=36, projector='conv', pred='v')
    os.makedirs(root / 'checkpoints')
    torch.save(dict(ema=irepa.build_model(args).state_dict(), args=args), root / 'checkpoints' / '0000010.pt')
    return root


@pytest.mark.parametrize('extra, msg', [
    (['--ckpt', 'RUN', '--image-size', '64'], "--image-size 64: with --ckpt the checkpoint's image size (32)"),
    (['--ckpt', 'RUN', '--grid-size', '16'], "--grid-size 16: with --ckpt the checkpoint's grid size (8)"),
    (['--out', 'OUT/m.png'], '--out is for the figures of --viz and --correlate'),
    (['--t', '0.3'], '--t is the noise level of SiT\'s input: it needs --ckpt'),
    (['--anchor', '1', '1'], '--anchor picks the token of the --viz figure: it needs --viz'),
    (['--ckpt', 'RUN', '--viz', 'OUT/x.png'], "--ckpt is for the table of SiT's features"),
    (['--viz', 'OUT/x.png', '--correlate', 'OUT/x.csv'], '--viz and --correlate are two modes'),
])
def test_flags_the_mode_would_ignore_are_refused(tmp_path, extra, msg):
    """Each flag here changes nothing in the table mode: a one-line error, before any image is read."""
    run = save_checkpoint(tmp_path / 'run')
    data = make_folder(tmp_path / 'data')
    extra = [str(run) if a == 'RUN' else a.replace('OUT', str(tmp_path)) for a in extra]
    with pytest.raises(SystemExit) as e:
        metrics.main(['--data-path', str(data), '--num-workers', '0'] + extra)
    assert msg in str(e.value) and '\n' not in str(e.value)
    assert not os.path.exists(tmp_path / 'm.png')


def test_checkpoint_takes_its_own_size_and_grid_when_given_again(tmp_path):
    run = save_checkpoint(tmp_path / 'run')
    data = make_folder(tmp_path / 'data')
    vals = metrics.main(['--ckpt', str(run), '--data-path', str(data), '--image-size', '32', '--grid-size', '8',
                         '--t', '0.5', '--num-workers', '0', '--num-images', '2'])
    assert len(vals['SiT h (block 2, t=0.5)']['lds']) == 2


@pytest.mark.parametrize('mode', ['viz', 'correlate'])
def test_out_must_be_a_png_before_anything_is_computed(tmp_path, monkeypatch, mode):
    img = make_folder(tmp_path / 'data', n=1) / 'c0' / '0.png'
    (tmp_path / 't.csv').write_text('encoder,fid,lds\na,1,0.1\nb,2,0.3\nc,3,0.2\n')
    monkeypatch.setattr(metrics, 'correlate', None)                              # nothing may be computed
    monkeypatch.setattr(irepa, 'load_encoder', None)
    args = ['--viz', str(img)] if mode == 'viz' else ['--correlate', str(tmp_path / 't.csv')]
    with pytest.raises(SystemExit) as e:
        metrics.main(args + ['--out', str(tmp_path / 'v.xyz')])
    assert "--out " + str(tmp_path / 'v.xyz') + ": the figure is a PNG" in str(e.value)


@pytest.mark.parametrize('text, msg', [
    ('encoder,fid,lds\ncaf\xe9,1,0.1\nb,2,0.3\nc,3,0.2\n'.encode('latin-1'), 'is not UTF-8 text'),
    (b'encoder,fid,lds\na,1,0.1\nb,2,0.3\na,3,0.2\nd,4,0.5\n', 'encoder a has more than one row'),
    (b'encoder,fid,LDS,linear probe\na,1,0.1,1\nb,2,0.3,2\nc,3,0.2,3\n',
     'unknown column(s) LDS, linear probe; the columns are encoder,fid,linear_probe,lds,cds,srss,rmsc'),
    (b'encoder,fid,lds,lds\na,1,0.1,0.2\nb,2,0.3,0.1\nc,3,0.2,0.3\n', 'column lds appears twice'),
])
def test_csv_encoding_duplicates_and_unknown_columns_are_one_line_errors(tmp_path, text, msg):
    (tmp_path / 't.csv').write_bytes(text)
    with pytest.raises(SystemExit) as e:
        metrics.main(['--correlate', str(tmp_path / 't.csv'), '--out', str(tmp_path / 'c.png')])
    assert msg in str(e.value) and '\n' not in str(e.value)
    assert not os.path.exists(tmp_path / 'c.png')


def test_csv_with_a_byte_order_mark_reads(tmp_path):
    (tmp_path / 't.csv').write_bytes('\ufeffencoder,fid\na,1\n'.encode('utf-8'))              # as Excel saves UTF-8
    assert metrics.read_table(tmp_path / 't.csv') == {'encoder': ['a'], 'fid': [1.0]}


@pytest.mark.filterwarnings('error')                                             # torch's UserWarning would fail it
def test_a_one_token_grid_is_one_line_and_no_warning(tmp_path):
    data = make_folder(tmp_path / 'data')
    with pytest.raises(SystemExit) as e:
        metrics.main(['--data-path', str(data), '--encoder', 'hog', '--image-size', '64', '--grid-size', '1',
                      '--num-workers', '0'])
    assert '--grid-size must be >= 2, got 1' in str(e.value)
