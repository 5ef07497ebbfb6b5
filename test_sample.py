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
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(cmd + [os.path.join(HERE, "sample.py"), *map(str, argv)], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=120)


def test_sample_function_is_deterministic(tiny_ckpt):
    model, args = irepa.load_sit(tiny_ckpt, "cpu")
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
             (["--ckpt", junk], "not an irepa.py or official iREPA/REPA checkpoint"),
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
    model, _ = irepa.load_sit(tiny_ckpt, "cpu")
    labels = torch.randint(4, (5,), generator=torch.Generator().manual_seed(1))
    ref = np.concatenate([sample.sample(model, labels[:3], num_steps=3, seed=2, batch_size=2),
                          sample.sample(model, labels[3:], num_steps=3, seed=3, batch_size=2)])
    assert np.abs(arr.astype(int) - ref).max() <= 1                         # <= 1: thread counts differ
