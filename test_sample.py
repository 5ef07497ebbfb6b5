"""Tests for sample.py: samplers on velocity fields with a known answer, CFG and its interval, and the CLI end to end."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import irepa
import trained
from test_irepa import torchrun_command
import sample

HERE = os.path.dirname(os.path.abspath(__file__))


class GaussianData(torch.nn.Module):
    """Exact flow-matching model for data x0 ~ N(mu_y, s^2) per element (s = 0: a point mass at mu_y), under
    x_t = (1 - t) x0 + t eps. x_t ~ N((1 - t) mu, var_t), var_t = (1 - t)^2 s^2 + t^2, and
    E[x0 | x_t] = mu + (1 - t) s^2 / var_t * (x_t - (1 - t) mu), E[eps | x_t] = t / var_t * (x_t - (1 - t) mu).
    pred='v' returns v = E[eps - x0 | x_t]; pred='x' returns E[x0 | x_t]. The null class has mean mu_null.
    Records the batch size of every call (to count CFG's doubled batches)."""
    def __init__(self, mu, s=0.0, mu_null=0.0, pred='v'):
        super().__init__()
        self.mu = torch.as_tensor(mu, dtype=torch.float64).flatten()   # (num_classes,)
        self.num_classes, self.s, self.mu_null, self.pred, self.calls = len(self.mu), s, mu_null, pred, []

    def posterior(self, x, t, y):
        """E[x0 | x_t], E[eps | x_t]."""
        mu = torch.cat([self.mu, torch.tensor([self.mu_null], dtype=torch.float64)])[y].view(-1, 1, 1, 1).to(x)
        t = t.view(-1, 1, 1, 1)
        var_t = (1 - t) ** 2 * self.s ** 2 + t ** 2
        r = x - (1 - t) * mu
        return mu + (1 - t) * self.s ** 2 / var_t * r, t / var_t * r

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0])))
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        x0, eps = self.posterior(x, t, y)
        return (eps - x0 if self.pred == 'v' else x0), None


def test_ode_lands_on_point_mass():
    # point mass at mu: v = (x - mu) / t, and each Euler step keeps x - mu proportional to t, so x(0) = mu exactly
    torch.manual_seed(0)
    model = GaussianData(mu=[1.5])
    x = torch.randn(64, 3, 4, 4, dtype=torch.float64)
    y = torch.zeros(64, dtype=torch.long)
    for heun in (False, True):
        out = sample.euler_sampler(model, x, y, num_steps=20, heun=heun)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, torch.full_like(x, 1.5), atol=1e-9, rtol=0)
    assert len(model.calls) == 20 + (2 * 20 - 1)                            # NFE: Euler N, Heun 2N - 1
    out = sample.euler_sampler(model, x.float(), y, num_steps=20)           # a float32 model, float64 state
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.full_like(x, 1.5), atol=1e-5, rtol=0)


def test_ode_transports_gaussian():
    # the exact flow of N(0, 1) -> N(mu, s^2) is the affine map z -> mu + s z, sample by sample
    torch.manual_seed(0)
    mu, s = 0.7, 0.3
    model = GaussianData(mu=[mu], s=s)
    z = torch.randn(256, 1, 2, 2, dtype=torch.float64)
    y = torch.zeros(256, dtype=torch.long)
    heun = sample.euler_sampler(model, z, y, num_steps=50, heun=True)
    torch.testing.assert_close(heun, mu + s * z, atol=2e-3, rtol=0)
    euler = sample.euler_sampler(model, z, y, num_steps=200)
    torch.testing.assert_close(euler, mu + s * z, atol=2e-2, rtol=0)


def test_sde_matches_gaussian_moments():
    # After 249 stochastic steps x ~ p_0.04 = N(0.96 mu, 0.96^2 s^2 + 0.04^2); the last, noise-free step is an
    # affine map x -> x + dt * drift(x), so the final mean and variance are known in closed form.
    torch.manual_seed(0)
    mu, s = 0.5, 0.4
    model = GaussianData(mu=[mu], s=s)
    x = torch.randn(4000, 1, 2, 2, dtype=torch.float64)                    # 16000 independent scalars
    out = sample.euler_maruyama_sampler(model, x, torch.zeros(4000, dtype=torch.long), num_steps=250)
    assert len(model.calls) == 250                                          # NFE = N
    assert model.calls[-1][1] == pytest.approx(0.04) and model.calls[-2][1] > 0.04
    t, dt = 0.04, -0.04
    var_t = (1 - t) ** 2 * s ** 2 + t ** 2
    g = (t - (1 - t) * s ** 2) / var_t                                      # v(x) = g (x - (1 - t) mu) - mu
    a = 1 + dt * ((2 - t) * g + 1)                                          # drift = (2 - t) v + x for w = 2t
    b = dt * (2 - t) * (-g * (1 - t) * mu - mu)
    mean, var = a * (1 - t) * mu + b, a ** 2 * var_t
    n = out.numel()
    assert abs(out.mean().item() - mean) < 4 * (var / n) ** 0.5 + 3e-3
    assert abs(out.var().item() / var - 1) < 4 * (2 / n) ** 0.5 + 0.02
    assert abs(mean - mu) < 1e-3 and abs(var / s ** 2 - 1) < 0.05          # and close to the data (var -3%)


def test_x_prediction_goes_through_to_velocity():
    # an x-prediction model gives the same samples as its velocity twin v = (x - x_hat) / max(t, 0.05)
    torch.manual_seed(0)
    class Twin(GaussianData):
        def forward(self, x, t, y):
            return irepa.to_velocity(self.posterior(x, t, y)[0], x, t, 'x'), None
    xpred, twin = GaussianData(mu=[0.5, -1.0], s=0.2, pred='x'), Twin(mu=[0.5, -1.0], s=0.2, pred='v')
    x, y = torch.randn(32, 3, 4, 4, dtype=torch.float64), torch.arange(32) % 2
    for run in (lambda m: sample.euler_sampler(m, x, y, num_steps=10, heun=True, cfg_scale=2.0),
                lambda m: (torch.manual_seed(1), sample.euler_maruyama_sampler(m, x, y, 20, cfg_scale=2.0))[1]):
        torch.testing.assert_close(run(xpred), run(twin), atol=1e-10, rtol=0)
    # while t >= 0.05 the conversion is exact: 10 Euler steps land on the point mass
    out = sample.euler_sampler(GaussianData(mu=[-1.0], pred='x'), x, torch.zeros(32, dtype=torch.long), 10)
    torch.testing.assert_close(out, torch.full_like(x, -1.0), atol=1e-9, rtol=0)


def test_cfg_scale_one_is_no_cfg():
    torch.manual_seed(0)
    model = GaussianData(mu=[1.0, -2.0], s=0.3)
    x, y = torch.randn(16, 1, 2, 2, dtype=torch.float64), torch.arange(16) % 2
    torch.manual_seed(0)
    a = sample.euler_maruyama_sampler(model, x, y, num_steps=30, cfg_scale=1.0)
    assert all(b == 16 for b, _ in model.calls)                            # only the conditional batch ran
    torch.manual_seed(0)
    b = sample.euler_maruyama_sampler(model, x, y, num_steps=30)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_cfg_guides_towards_scaled_class_mean():
    # point masses mu_y and mu_null = 0: null + s (cond - null) = (x - s mu_y) / t, whose ODE lands on s * mu_y
    torch.manual_seed(0)
    model = GaussianData(mu=[1.0, -2.0], mu_null=0.0)
    x, y = torch.randn(16, 1, 2, 2, dtype=torch.float64), torch.arange(16) % 2
    out = sample.euler_sampler(model, x, y, num_steps=20, cfg_scale=1.5)
    target = torch.tensor([1.5, -3.0], dtype=torch.float64)[y].view(-1, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(out, target, atol=1e-9, rtol=0)


@pytest.mark.parametrize("mode", ["ode", "heun", "sde"])
def test_guidance_interval_doubles_only_inside(mode):
    torch.manual_seed(0)
    B, N, low, high = 4, 25, 0.2, 0.7
    model = GaussianData(mu=[1.0, -1.0], s=0.5)
    x, y = torch.randn(B, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    if mode == 'sde':
        sample.euler_maruyama_sampler(model, x, y, N, cfg_scale=2.0, guidance_low=low, guidance_high=high)
        grid = torch.linspace(1, 0.04, N, dtype=torch.float64).tolist()
    else:
        sample.euler_sampler(model, x, y, N, heun=mode == 'heun', cfg_scale=2.0, guidance_low=low, guidance_high=high)
        grid = torch.linspace(1, 0, N + 1, dtype=torch.float64).tolist()[:-1]
    inside = [t for t in grid if low <= t <= high]
    assert 0 < len(inside) < len(grid)
    if mode != 'heun':
        for batch, t in model.calls:                                        # t as the model saw it (float64)
            assert batch == (2 * B if low <= t <= high else B), (batch, t)
        assert [t for b, t in model.calls if b == 2 * B] == inside
    else:                                 # predictor at t_cur, corrector at t_next, both guided as t_cur (REPA)
        expected = []
        for i, t_cur in enumerate(grid):
            expected += [2 * B if low <= t_cur <= high else B] * (2 if i < N - 1 else 1)
        assert [b for b, _ in model.calls] == expected


# -----------------------------------------------------------------------------
# End to end: a tiny checkpoint from irepa.py, the CLI, torchrun with 2 CPU processes

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """Two training steps of irepa.py (tiny SiT, 16 px shapes, HOG target, iREPA) on CPU."""
    d = tmp_path_factory.mktemp("results")
    r = subprocess.run([sys.executable, os.path.join(HERE, "irepa.py"), "--setting", "demo", "--model", "SiT-T/4", "--image-size", "16",
                        "--encoder", "hog", "--irepa", "--max-steps", "2", "--global-batch-size", "4",
                        "--num-workers", "0", "--results-dir", str(d)],
                       cwd=HERE, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    (path,) = glob.glob(os.path.join(d, "*", "checkpoints", "0000002.pt"))
    return path


def run_cli(*argv, torchrun=False):
    cmd = torchrun_command() if torchrun else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(cmd + [os.path.join(HERE, "sample.py"), *map(str, argv)], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=120)


def test_sample_function_is_deterministic(tiny_ckpt):
    model, args = trained.load_sit(tiny_ckpt, "cpu")
    state = torch.get_rng_state()
    a = sample.sample(model, [0, 1, 2], mode='sde', num_steps=4, cfg_scale=1.5, seed=3, batch_size=2)
    b = sample.sample(model, [0, 1, 2], mode='sde', num_steps=4, cfg_scale=1.5, seed=3, batch_size=2)
    c = sample.sample(model, [0, 1, 2], mode='ode', num_steps=4, seed=4, batch_size=2)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert torch.equal(state, torch.get_rng_state())                       # caller's RNG untouched


def test_cli_writes_grid_and_npz(tiny_ckpt, tmp_path):
    r = run_cli("--ckpt", tiny_ckpt, "--mode", "ode", "--heun", "--num-steps", 3, "--cfg-scale", 2.0,
                "--class-labels", 1, 3, "--num-samples", 6, "--batch-size", 4, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    assert Image.open(tmp_path / "grid.png").size == (2 * 130 + 2, 3 * 142 + 2)  # a column per class, 3 rows
    assert "sampled 6/6" in r.stdout                                        # progress


def test_save_grid_labels_tiles(tmp_path):
    images = np.full((5, 16, 16, 3), 200, np.uint8)
    sample.save_grid(images, tmp_path / "plain.png")
    sample.save_grid(images, tmp_path / "named.png", labels=[0, 1, 0, 1, 0], class_names=["circle", "square"], nrow=2)
    plain, named = np.array(Image.open(tmp_path / "plain.png")), np.array(Image.open(tmp_path / "named.png"))
    assert plain.shape == (2 * 130 + 2, 3 * 130 + 2, 3)                     # 3 x 2, tiles zoomed 8x to 128 px
    assert named.shape == (3 * 142 + 2, 2 * 130 + 2, 3)                     # 2 x 3 with a 12 px name strip each
    assert (named[2:14, 2:130] < 128).any() and (plain[2:14, 2:130] == 200).all()   # the text is drawn


def test_cli_errors_are_one_line(tiny_ckpt, tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({'state_dict': {}}, junk)
    cases = [(["--ckpt", tmp_path / "missing.pt"], "no checkpoint"),
             (["--ckpt", junk], "not an irepa.py or official iREPA (ldm/train.py) checkpoint"),
             (["--ckpt", tiny_ckpt, "--cfg-scale", 0.5], "--cfg-scale"),
             (["--ckpt", tiny_ckpt, "--num-steps", 0], "--num-steps must be >= 1"),
             (["--ckpt", tiny_ckpt, "--batch-size", 0], "--batch-size must be >= 1"),
             (["--ckpt", tiny_ckpt, "--num-samples", -2], "--num-samples must be >= 1"),
             (["--ckpt", tiny_ckpt, "--guidance-low", 0.8, "--guidance-high", 0.7], "--guidance-low must be <="),
             (["--ckpt", tiny_ckpt, "--out", tiny_ckpt], "is a file, not a folder"),
             (["--ckpt", tiny_ckpt, "--class-labels", 3, 4], "out of range")]
    for argv, msg in cases:
        r = run_cli("--out", tmp_path, *argv)                               # a later --out wins
        assert r.returncode != 0 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_torchrun_two_ranks_write_one_npz(tiny_ckpt, tmp_path):
    r = run_cli("--ckpt", tiny_ckpt, "--mode", "sde", "--cfg-scale", 1, "--num-steps", 3, "--num-samples", 5,
                "--batch-size", 2, "--seed", 1, "--out", tmp_path, torchrun=True)
    assert r.returncode == 0, r.stderr
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "samples.npz"]     # per-rank parts cleaned up
    # rank r sampled the r-th contiguous share with seed 1 * 2 + r; labels are drawn from the global seed
    model, _ = trained.load_sit(tiny_ckpt, "cpu")
    labels = torch.randint(4, (5,), generator=torch.Generator().manual_seed(1))
    ref = np.concatenate([sample.sample(model, labels[:3], num_steps=3, seed=2, batch_size=2),
                          sample.sample(model, labels[3:], num_steps=3, seed=3, batch_size=2)])
    assert np.abs(arr.astype(int) - ref).max() <= 1                         # <= 1: thread counts differ


# -----------------------------------------------------------------------------
# Pinned by hand: the Euler-Maruyama chain in closed form, the guidance interval's ends, pixels out, the defaults

def em_moments(mu, s, grid, m, var, w=lambda t: 2 * t, score_sign=1.0, noise_var=lambda w, dt: w * abs(dt)):
    """Mean and variance of Euler-Maruyama (SPEC 10) for data N(mu, s^2), started from N(m, var), on `grid`.
    The exact velocity v(x, t) = k (x - (1 - t) mu) - mu, k = (t - (1 - t) s^2) / var_t, is affine in x, so each step
    maps N(m, V) to N(m + dt (A m + B), (1 + dt A)^2 V + w |dt|) with A x + B = v - w / 2 * score and
    score = (-(1 - t) v - x) / t; the last step (to t = 0) adds no noise. The keywords give wrong variants."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t
        k = (t - (1 - t) * s ** 2) / ((1 - t) ** 2 * s ** 2 + t ** 2)
        av, bv = k, -k * (1 - t) * mu - mu                                    # v = av x + bv
        a_s, b_s = score_sign * (-(1 - t) * av - 1) / t, score_sign * -(1 - t) * bv / t   # score = a_s x + b_s
        A, B = av - 0.5 * w(t) * a_s, bv - 0.5 * w(t) * b_s
        m, var = m + dt * (A * m + B), (1 + dt * A) ** 2 * var + (noise_var(w(t), dt) if t_next > 0 else 0.0)
    return m, var


@pytest.mark.parametrize("mu, s, start, steps", [(0.5, 0.4, "normal", 3), (0.5, 0.4, "point", 3),
                                                 (1.5, 0.0, "normal", 3), (1.5, 0.0, "normal", 50)])
def test_sde_matches_the_chain_in_closed_form(mu, s, start, steps):
    """Euler-Maruyama on Gaussian data (grid linspace(1, 0.04, N), then a noise-free step to 0): the samples' mean
    and variance match em_moments within 5 standard errors (400,000 or 20,000 samples). With 3 steps the diffusion
    w = 2t, the score's sign and the sqrt(|dt|) noise scale each move the result far outside that (checked on the
    closed form; with 250 steps any w samples the data); with 50 steps on a point mass, so does noise on the last
    step."""
    torch.manual_seed(0)
    n, (m0, v0) = 400_000 if steps == 3 else 20_000, (0.0, 1.0) if start == "normal" else (-0.3, 0.0)
    x = m0 + v0 ** 0.5 * torch.randn(n // 4, 1, 2, 2, dtype=torch.float64)
    model = GaussianData(mu=[mu], s=s)
    out = sample.euler_maruyama_sampler(model, x, torch.zeros(n // 4, dtype=torch.long), num_steps=steps)
    grid = [1 - 0.96 * i / (steps - 1) for i in range(steps)]
    assert [t for _, t in model.calls] == pytest.approx(grid, abs=1e-12)
    m, v = em_moments(mu, s, grid + [0.0], m0, v0)
    se_m, se_v = (v / n) ** 0.5, v * (2 / n) ** 0.5
    assert abs(out.mean().item() - m) < 5 * se_m and abs(out.var().item() - v) < 5 * se_v, (out.mean(), m, out.var())
    if steps == 3:
        wrong = [em_moments(mu, s, grid + [0.0], m0, v0, w=lambda t: t),
                 em_moments(mu, s, grid + [0.0], m0, v0, score_sign=-1.0),
                 em_moments(mu, s, grid + [0.0], m0, v0, noise_var=lambda w, dt: w)]
    else:
        wrong = [em_moments(mu, s, grid + [1e-300], m0, v0)]                  # noise on the last step too
    for mw, vw in wrong:
        assert abs(mw - m) > 10 * se_m or abs(vw - v) > 10 * se_v


def test_guidance_interval_includes_both_ends():
    """low <= t <= high with both ends guided (REPA's interval): on the exact grid 1, 0.75, 0.5, 0.25 (4 Euler steps)
    with the interval [0.25, 0.75] the last three times run the doubled batch and t = 1 does not."""
    torch.manual_seed(0)
    model = GaussianData(mu=[1.0, -1.0], s=0.5)
    x, y = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    sample.euler_sampler(model, x, y, 4, cfg_scale=2.0, guidance_low=0.25, guidance_high=0.75)
    assert model.calls == [(4, 1.0), (8, 0.75), (8, 0.5), (8, 0.25)]


class Canvas(torch.nn.Module):
    """Stand-in model for sample.sample: 3 x 2 x 2 images, 5 classes; one parameter tells the device."""
    in_channels, input_size, num_classes, pred = 3, 2, 5, 'v'

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_pixels_out_and_the_samplers_inputs(monkeypatch):
    """sample.sample maps the sampler's [-1, 1] to uint8 as ((x + 1) * 127.5) clamped to [0, 255] and rounded:
    -1 -> 0, 0 -> 128 (127.5, to even), 1 -> 255, -3 -> 0, 2 -> 255, 10.4 -> 10, 10.6 -> 11; laid out (N, H, W, 3),
    rows first. Its starting noise is N(0, 1) from torch.manual_seed(seed), batch after batch, with each batch's
    labels and the sampler settings handed on."""
    chw = torch.tensor([[[-1.0, 1.0], [0.0, 2.0]],
                        [[-3.0, 10.4 / 127.5 - 1], [10.6 / 127.5 - 1, 200 / 127.5 - 1]],
                        [[-1.0, -1.0], [1.0, -1.0]]], dtype=torch.float64)    # (C, H, W)
    seen = []
    def fake(model, x, y, *settings):
        seen.append((x.clone(), y.clone(), settings))
        return chw.expand(len(x), -1, -1, -1).clone()
    monkeypatch.setattr(sample, 'euler_maruyama_sampler', fake)
    out = sample.sample(Canvas(), [0, 3, 4], mode='sde', num_steps=7, cfg_scale=1.5, guidance_high=0.7, seed=5,
                        batch_size=2)
    want = np.array([[[0, 255], [128, 255]], [[0, 10], [11, 200]], [[0, 0], [255, 0]]]).transpose(1, 2, 0)
    assert out.dtype == np.uint8 and out.shape == (3, 2, 2, 3) and (out == want).all()
    torch.manual_seed(5)
    noise = torch.randn(2, 3, 2, 2), torch.randn(1, 3, 2, 2)
    assert [s[1].tolist() for s in seen] == [[0, 3], [4]]
    for (x, _, settings), ref in zip(seen, noise):
        assert torch.equal(x, ref) and settings == (7, 1.5, 0.0, 0.7)
    monkeypatch.setattr(sample, 'euler_sampler', fake)
    seen.clear()
    sample.sample(Canvas(), [1], mode='ode', num_steps=9, heun=True, guidance_low=0.1)
    assert seen[0][2] == (9, True, 1.0, 0.1, 1.0)


def test_sampler_defaults_are_spec_section_10():
    """REPA's FID sampler is the default wherever a user starts: the SDE with 250 steps (NFE 250), no CFG, guidance
    interval [0, 1]; the ODE defaults to 50 Euler steps; the CLI's guidance interval is [0, 1] and seed 0."""
    import inspect
    defaults = lambda f: {k: p.default for k, p in inspect.signature(f).parameters.items()
                          if p.default is not inspect.Parameter.empty}
    assert defaults(sample.euler_maruyama_sampler) == dict(num_steps=250, cfg_scale=1.0, guidance_low=0.0,
                                                           guidance_high=1.0)
    assert defaults(sample.euler_sampler) == dict(num_steps=50, heun=False, cfg_scale=1.0, guidance_low=0.0,
                                                  guidance_high=1.0)
    d = defaults(sample.sample)
    assert (d['mode'], d['num_steps'], d['heun'], d['cfg_scale'], d['guidance_low'], d['guidance_high']) == (
        'sde', 250, False, 1.0, 0.0, 1.0)
    a = sample.get_args(['--ckpt', 'x'])
    assert (a.guidance_low, a.guidance_high, a.seed, a.mode, a.num_steps, a.cfg_scale) == (0.0, 1.0, 0, None, None,
                                                                                           None)


def test_cli_takes_the_sampler_from_the_recipe(tiny_ckpt, tmp_path, monkeypatch):
    """Without sampler flags sample.py samples as the checkpoint's recipe says (demo: Heun, 25 steps, CFG 4); another
    --mode gets that mode's own steps (SDE 250, ODE 50) without Heun, the same CFG; the guidance interval is [0, 1];
    a checkpoint without a recipe (e.g. an official one) gets REPA's FID sampler: SDE, 250 steps, no CFG. With 4
    classes and no --num-samples: 8 of each, in class order, seed 0."""
    calls = []
    def fake(model, labels, *settings, **kw):
        calls.append((list(labels), settings, kw['seed']))
        return np.zeros((len(labels), 16, 16, 3), np.uint8)
    monkeypatch.setattr(sample, 'sample', fake)
    ck = torch.load(tiny_ckpt, weights_only=False)
    del ck['args']['sampler']
    torch.save(ck, tmp_path / 'bare.pt')
    cases = [([], ('ode', 25, True, 4.0, 0.0, 1.0)), (['--mode', 'sde'], ('sde', 250, False, 4.0, 0.0, 1.0)),
             (['--mode', 'ode'], ('ode', 25, True, 4.0, 0.0, 1.0)),
             (['--ckpt', tmp_path / 'bare.pt'], ('sde', 250, False, 1.0, 0.0, 1.0))]
    for argv, want in cases:
        calls.clear()
        sample.main(['--ckpt', tiny_ckpt, '--out', str(tmp_path / 'out'), *map(str, argv)])
        (labels, settings, seed), = calls
        assert settings == want and labels == list(range(4)) * 8 and seed == 0, argv
