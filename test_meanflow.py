"""Tests for MeanFlow (meanflow.py, sample.py's meanflow_sampler): the jvp, the target, the adaptive weight,
guidance, the samplers' closed forms, DDP, resume, and a loss that trains. CPU only: python -m pytest -q"""
import os

import numpy as np
import pytest
import torch

import irepa
import meanflow
import runs
import sample
from test_irepa import TRAIN, load_last, run_train, torchrun

MF = ['--objective', 'meanflow']


def tiny_mf(**kw):
    """A tiny MeanFlow SiT with every weight random (not adaLN-Zero's zeros), so u depends on every input."""
    torch.manual_seed(0)
    cfg = dict(input_size=8, patch_size=4, hidden_size=32, depth=3, num_heads=2, num_classes=5, encoder_depth=2)
    model = meanflow.MeanFlowSiT(**{**cfg, **kw})
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    return model


def batch(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(B, 3, 8, 8, generator=g), torch.randn(B, 3, 8, 8, generator=g)
    t = torch.rand(B, generator=g) * 0.8 + 0.2
    return x, noise, t, t * torch.rand(B, generator=g)                         # r <= t


def test_interval_embedder_only_for_meanflow():
    """Flow-matching SiTs keep the official parameter names; MeanFlow adds a time embedding for t - r, initialised like
    t's (weights N(0, 0.02), zero biases), and leaves the rest of SiT's initial weights as a seed gives them."""
    cfg = dict(input_size=8, patch_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=5, encoder_depth=1)
    torch.manual_seed(3)
    fm = irepa.SiT(**cfg)
    torch.manual_seed(3)
    mf = meanflow.MeanFlowSiT(**cfg)
    assert 'meanflow' not in irepa.SiT.__init__.__code__.co_varnames           # SiT itself knows no MeanFlow
    assert not any('interval' in k for k in fm.state_dict())
    extra = set(mf.state_dict()) - set(fm.state_dict())
    assert extra == {f'interval_embedder.mlp.{i}.{p}' for i in (0, 2) for p in ('weight', 'bias')}
    for k, v in fm.state_dict().items():
        assert torch.equal(v, mf.state_dict()[k]), k
    w = mf.interval_embedder.mlp[0].weight
    assert abs(w.std().item() - 0.02) < 0.004 and not mf.interval_embedder.mlp[0].bias.any()
    mf, x, y, t = tiny_mf(), torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([0.7, 0.3])
    assert torch.equal(mf(x, t, y)[0], mf(x, t, y, torch.zeros(2))[0])      # no interval: 0, the velocity
    assert not torch.allclose(mf(x, t, y, torch.full((2,), 0.5))[0], mf(x, t, y)[0])


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_du_dt_is_the_derivative_along_the_flow(precision):
    """jvp with tangents (v_g, 1, 0) = d/de u(z + e v_g, t + e, y, (t + e) - r) at e = 0, by central differences (in
    float64 for fp32; bf16 autocast, with this file's explicit CPU attention, within bf16's precision)."""
    model = tiny_mf()
    x, noise, t, r = batch()
    y, v_g = torch.tensor([0, 1, 2, 5]), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    if precision == 'fp32':
        model, z, t, r, v_g = model.double(), x.double(), t.double(), r.double(), v_g.double()
        du_dt = meanflow.meanflow_du_dt(model, z, t, r, y, v_g).double()
    else:
        z = x
        with torch.autocast('cpu', dtype=torch.bfloat16):
            du_dt = meanflow.meanflow_du_dt(model, z, t, r, y, v_g)
        model, z, t, r, v_g = model.double(), z.double(), t.double(), r.double(), v_g.double()
    e = 1e-3                                  # SiT's time embedding computes in float32: a smaller e sees its rounding
    u = lambda e: model(z + e * v_g, t + e, y, t + e - r)[0]
    fd = (u(e) - u(-e)) / (2 * e)
    assert fd.abs().mean() > 0.1                                               # a derivative that is not ~0
    scale = fd.abs().max().item()
    tol = dict(atol=1e-4 * scale, rtol=1e-3) if precision == 'fp32' else dict(atol=0.05 * scale, rtol=0.05)
    torch.testing.assert_close(du_dt.double(), fd, **tol)


def hand_loss(model, x, y, noise, t, u_tgt, p, eps):
    """The objective written out: per sample the SUM of squares, weighted by 1 / stopgrad(l + eps)^p."""
    z_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    u = model(z_t, t, y, torch.zeros_like(t))[0]
    err = ((u - u_tgt) ** 2).sum(dim=(1, 2, 3))
    return (err / (err.detach() + eps) ** p).mean(), err


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [q.grad.clone() for q in model.parameters() if q.requires_grad]


@pytest.mark.parametrize('p, eps', [(1.0, 0.01), (0.75, 1e-3), (0.0, 0.01)])
def test_r_equal_t_without_guidance_is_weighted_flow_matching(p, eps):
    """With r = t and omega 1, kappa 0 the target is v = noise - x and the loss is the flow-matching error (a sum over
    C, H, W) under the adaptive weight: the gradient equals the hand-written loss's; the value returned is the mean
    error (what the log shows)."""
    model = tiny_mf()
    x, noise, t, _ = batch()
    y = torch.tensor([0, 1, 2, 3])
    loss, align = meanflow.meanflow_loss(model, x, y, noise, torch.stack([t, t], 1), raw_model=model, omega=1.0, kappa=0.0,
                                      p=p, eps=eps)
    want, err = hand_loss(model, x, y, noise, t, noise - x, p, eps)
    assert align == 0                                                            # no target: nothing to align
    torch.testing.assert_close(loss, err.mean(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(model, loss), grads(model, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_guidance_mixing_by_hand_and_dropped_labels_keep_v():
    """v_g = omega v + kappa u(z_t, t | y) + (1 - omega - kappa) u(z_t, t | null), with u at interval 0 and without
    gradient; a sample whose label was dropped (y = null) trains on v itself. r = t, so the target is v_g."""
    model = tiny_mf()
    x, noise, t, _ = batch()
    y, null = torch.tensor([0, 5, 2, 5]), 5                                    # samples 1 and 3: dropped labels
    omega, kappa, p, eps = 0.6, 0.3, 1.0, 0.01
    loss, _ = meanflow.meanflow_loss(model, x, y, noise, torch.stack([t, t], 1), raw_model=model, omega=omega, kappa=kappa,
                                  p=p, eps=eps)
    z_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        u_c = model(z_t, t, y, torch.zeros(4))[0]
        u_u = model(z_t, t, torch.full_like(y, null), torch.zeros(4))[0]
    v = noise - x
    v_g = omega * v + kappa * u_c + (1 - omega - kappa) * u_u
    v_g[1], v_g[3] = v[1], v[3]
    want, err = hand_loss(model, x, y, noise, t, v_g, p, eps)
    torch.testing.assert_close(loss, err.mean(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(model, loss), grads(model, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('omega, kappa', [(1.0, 0.0), (0.6, 0.3)])
def test_target_subtracts_the_interval_times_du_dt(omega, kappa):
    """r < t: u_tgt = v_g - (t - r) du/dt, du/dt along (v_g, 1, 0) (the guided velocity, not v), guidance from u at
    interval 0; the target is held fixed and the gradient flows through u(z_t, t, y, t - r)."""
    model = tiny_mf()
    x, noise, t, r = batch()
    y = torch.tensor([0, 1, 2, 3])
    loss, _ = meanflow.meanflow_loss(model, x, y, noise, torch.stack([t, r], 1), raw_model=model, omega=omega, kappa=kappa,
                                  p=0.0, eps=0.01)
    z_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    v, e, zero = noise - x, 1e-3, torch.zeros(4)
    with torch.no_grad():
        v_g = (omega * v + kappa * model(z_t, t, y, zero)[0] +
               (1 - omega - kappa) * model(z_t, t, torch.full_like(y, 5), zero)[0])
        fd = (model(z_t + e * v_g, t + e, y, t + e - r)[0] - model(z_t - e * v_g, t - e, y, t - e - r)[0]) / (2 * e)
    u_tgt = v_g - (t - r).view(-1, 1, 1, 1) * fd                               # du/dt by central differences
    u = model(z_t, t, y, t - r)[0]
    want = ((u - u_tgt) ** 2).sum(dim=(1, 2, 3)).mean()                        # p = 0: the plain mean of the sums
    torch.testing.assert_close(loss, want, rtol=2e-3, atol=1e-4)
    for a, b in zip(grads(model, loss), grads(model, want)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=5e-4)            # the finite differences' error


def mf_inputs(args, images, labels, rank=0, world=1, step=0):
    args.in_channels, args.input_size, args.num_classes = 3, 16, 4
    return irepa.training_inputs(images, labels, step, args, rank=rank, world=world, generator=torch.Generator(),
                                 sd_vae=None, encoder=None, mixed_precision=torch.autocast('cpu', enabled=False),
                                 times=meanflow.objective(args, None)[1] if args.objective == 'meanflow' else None)


@pytest.mark.parametrize('B', [4000, 40, 10, 8, 2])
def test_training_inputs_draw_r_below_t_for_exactly_a_quarter_and_never_for_dropped_labels(B):
    """The official rule (Gsunshine/meanflow meanflow.py): r = t on the first 75% of the rows and the labels dropped
    from the first rows, so exactly B - int(0.75 B) rows have r != t, none with a dropped label."""
    args = irepa.get_args(TRAIN + MF + ['--global-batch-size', str(B)])
    images, labels = torch.zeros(B, 3, 16, 16, dtype=torch.uint8), torch.arange(B) % 4
    x, y, noise, tr, target = mf_inputs(args, images, labels)
    t, r = tr.unbind(1)
    assert tr.shape == (B, 2) and (r <= t).all() and target is None
    differ = r < t                                              # continuous draws: r = t only where it was set so
    assert not differ[y == 4].any()                                            # dropped labels: r = t
    assert differ.sum().item() == {4000: 1000, 40: 10, 10: 3, 8: 2, 2: 1}[B]     # a quarter: B - int(0.75 B)
    if B == 4000:
        logit = torch.logit(torch.cat([t, r[differ]]).double())                 # max / min of two N(-0.4, 1) draws
        assert logit.mean() > -0.4 > torch.logit(r[differ].double()).mean()
        fm = irepa.get_args(TRAIN + ['--global-batch-size', str(B)])            # flow matching's draws unchanged
        x2, y2, noise2, t2, _ = mf_inputs(fm, images, labels)
        assert torch.equal(noise, noise2) and torch.equal(y, y2)
    # rank 1 of 2 gets the second half of the global batch's rows, r included
    half = mf_inputs(args, images[B // 2:], labels[B // 2:], rank=1, world=2)
    assert torch.equal(half[3], tr[B // 2:]) and torch.equal(half[1], y[B // 2:])


class KnownU(torch.nn.Module):
    """u(x, t, y, interval) = x * t + interval + y: a model whose samples have a closed form."""
    num_classes, in_channels, input_size, pred = 3, 1, 1, 'v'

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, y, interval=None):
        self.calls.append((t[0].item(), interval[0].item()))
        shape = (-1, 1, 1, 1)
        return x * t.view(shape) + interval.view(shape) + y.view(shape).to(x.dtype), None


@pytest.mark.parametrize('k', [1, 4])
def test_meanflow_sampler_closed_form(k):
    """k steps on linspace(1, 0, k + 1): z <- z - d u(z, t_i, y, d), d = t_i - t_i+1; one step: z_1 - u(z_1, 1, 1)."""
    model = KnownU()
    z1, y = torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1, 1), torch.tensor([0, 1, 2])
    out = sample.meanflow_sampler(model, z1.clone(), y, num_steps=k)
    z, d = z1.double(), 1.0 / k
    for i in range(k):
        t = 1.0 - i * d
        z = z - d * (z * t + d + y.view(-1, 1, 1, 1))
    torch.testing.assert_close(out, z)
    assert [c[0] for c in model.calls] == pytest.approx([1 - i / k for i in range(k)])
    assert [c[1] for c in model.calls] == pytest.approx([1 / k] * k)
    if k == 1:
        torch.testing.assert_close(out, z1.double() - (z1.double() + 1 + y.view(-1, 1, 1, 1)))


def test_demo_trains_and_samples_in_1_and_4_nfe(tmp_path):
    """The switch reaches every part: the recipe (stored in the checkpoint), SiT's second embedding, the log, the run
    name, and sample.py's default of 1 NFE."""
    run = run_train(tmp_path, *MF, '--encoder', 'hog', '--irepa', '--max-steps', '2')
    ck = load_last(run)
    assert os.path.basename(run) == 'demo-SiT-T-4-hog-irepa-meanflow'
    a = ck['args']
    assert (a['objective'], tuple(a['time_dist']), tuple(a['betas']), a['clip_grad']) == (
        'meanflow', (-0.4, 1.0), (0.9, 0.95), None)
    assert a['meanflow'] == dict(ratio=0.25, omega=1.0, kappa=0.5, p=1.0, eps=0.01)
    assert a['sampler'] == dict(mode='meanflow', num_steps=1)
    assert 'interval_embedder.mlp.0.weight' in ck['model'] and 'projectors.0.weight' in ck['model']
    log = open(os.path.join(run, 'log.txt')).read()
    assert '(mf ' in log and 'does not apply' not in log                       # the demo predicts v already
    for extra, nfe in (([], 1), (['--num-steps', '4'], 4)):
        out = sample.main(['--ckpt', run, '--out', str(tmp_path / f's{nfe}'), *extra])
        assert np.load(os.path.join(out, 'samples.npz'))['arr_0'].shape == (32, 16, 16, 3)
    fm = run_train(tmp_path / 'fm', '--encoder', 'none', '--max-steps', '1')
    with pytest.raises(SystemExit, match='--objective meanflow'):
        sample.main(['--ckpt', fm, '--mode', 'meanflow', '--out', str(tmp_path / 'x')])


def test_pixel_meanflow_says_it_drops_x_prediction(tmp_path):
    run = irepa.main(['--setting', 'pixel', '--model', 'SiT-T/4', '--image-size', '16', '--encoder', 'none', *MF,
                      '--global-batch-size', '8', '--max-steps', '1', '--num-workers', '0',
                      '--results-dir', str(tmp_path)])
    assert load_last(run)['args']['pred'] == 'v'
    assert "the pixel setting's x-prediction does not apply" in open(os.path.join(run, 'log.txt')).read()


def test_meanflow_resume_is_bit_identical(tmp_path):
    common = [*MF, '--encoder', 'hog', '--irepa', '--ckpt-every', '2']
    straight = run_train(tmp_path / 'a', *common, '--max-steps', '4')
    half = run_train(tmp_path / 'b', *common, '--max-steps', '2')
    irepa.main(['--resume', half, '--max-steps', '4'])
    a, b = load_last(straight), load_last(half)
    assert b['step'] == 4 and b['args']['objective'] == 'meanflow'
    for part in ('model', 'ema'):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_meanflow_two_cpu_ranks_and_grad_accum_equal_one_process(tmp_path, monkeypatch):
    """The jvp runs on the plain module and the gradient through DDP: 2 ranks, and 2 micro-batches, train as one."""
    monkeypatch.setenv('IREPA_PRECISION', 'fp32')
    args = TRAIN + MF + ['--encoder', 'hog', '--irepa', '--max-steps', '2']
    r = torchrun(*args, '--results-dir', str(tmp_path / 'ddp'))
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = load_last(os.path.join(tmp_path, 'ddp', 'demo-SiT-T-4-hog-irepa-meanflow'))
    one = load_last(run_train(tmp_path / 'one', *MF, '--encoder', 'hog', '--irepa', '--max-steps', '2'))
    acc = load_last(run_train(tmp_path / 'acc', *MF, '--encoder', 'hog', '--irepa', '--max-steps', '2',
                              '--grad-accum', '2'))
    assert ddp['args']['world_size'] == 2
    for k in one['model']:
        torch.testing.assert_close(ddp['model'][k], one['model'][k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(acc['model'][k], one['model'][k], atol=1e-5, rtol=1e-4)


def test_meanflow_loss_falls_on_a_repeated_batch():
    model = tiny_mf()
    x, noise, t, r = batch(B=8, seed=4)
    y = torch.arange(8) % 5
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=3e-3)
    losses = []
    for _ in range(60):
        loss, _ = meanflow.meanflow_loss(model, x, y, noise, torch.stack([t, r], 1), raw_model=model, omega=1.0, kappa=0.5,
                                      p=1.0, eps=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_meanflow_settings_checked(tmp_path):
    args = irepa.get_args(['--setting', 'demo', *MF, '--results-dir', str(tmp_path)])
    args.meanflow = dict(args.meanflow, ratio=1.5)
    with pytest.raises(SystemExit, match="the recipe's ratio must be in \\[0, 1\\], got 1.5"):
        runs.check_settings(args)
    args.meanflow = dict(args.meanflow, ratio=0.25, eps=0.0)                   # 1 / (0 + 0)^p on an exact fit
    with pytest.raises(SystemExit, match="the recipe's eps must be > 0 when p > 0"):
        runs.check_settings(args)
    args.meanflow = dict(args.meanflow, p=0.0)                                  # no weight: eps unused
    runs.check_settings(args)


def test_bench_times_the_meanflow_step():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, 'bench.py', '--model', 'SiT-T/4', '--image-size', '16', '--batch-size', '4',
                        '--repeats', '1', '--warmup', '0', '--objective', 'meanflow'], capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 0, r.stderr
    assert 'iREPA meanflow' in r.stdout and r.stdout.count('ms/step') == 2


@pytest.mark.parametrize('kept', [0, 1, 3, 10, 15, 40])
def test_dropped_labels_never_get_r_below_t_even_when_most_are_dropped(kept):
    """With all but `kept` of 40 labels dropped, exactly min(kept, the quarter) rows get r != t, all with kept labels."""
    B, quota = 40, 40 - int(0.75 * 40)
    g = torch.Generator().manual_seed(kept)
    t = torch.rand(B, generator=g)
    dropped = torch.ones(B, dtype=torch.bool)
    dropped[torch.randperm(B, generator=g)[:kept]] = False
    t, r = meanflow.meanflow_times(t, dropped, ratio=0.25, time_dist=(-0.4, 1.0), generator=g).unbind(1)
    differ = r < t
    assert (r <= t).all() and not differ[dropped].any()                       # dropped: r = t, on every row
    assert differ.sum().item() == min(kept, quota)                             # kept labels are drawn first


@pytest.mark.parametrize('drop', [0.9, 1.0])
def test_training_inputs_keep_r_equal_t_when_most_or_all_labels_are_dropped(monkeypatch, drop):
    """Label drop 0.9 or 1.0 in training: every null-class row has r = t, and the kept rows fill the quarter first."""
    monkeypatch.setattr(irepa, 'LABEL_DROP', drop)
    B = 4000
    args = irepa.get_args(TRAIN + MF + ['--global-batch-size', str(B)])
    images, labels = torch.zeros(B, 3, 16, 16, dtype=torch.uint8), torch.arange(B) % 4
    x, y, noise, tr, target = mf_inputs(args, images, labels)
    t, r = tr.unbind(1)
    dropped = y == 4
    assert dropped.sum().item() > B // 2 and (r <= t).all()
    assert torch.equal(r[dropped], t[dropped])                                  # dropped: r = t
    assert torch.equal(r < t, ~dropped)                                         # fewer kept than B/4: all of them
