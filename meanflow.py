"""
meanflow.py -- a second objective on the same SiT and alignment code: MeanFlow (Geng et al., arXiv
2505.13447; official Gsunshine/meanflow meanflow.py and Gsunshine/py-meanflow), the "MeanFlow w/
REPA" of iREPA Table 3b. The network u(x_t, t, y, interval = t - r) learns the average velocity over
[r, t], so that one step x_0 = x_1 - u(x_1, 1, y, 1) draws a sample (sample.py --mode meanflow). The
alignment loss is unchanged.

`python irepa.py ... --objective meanflow` applies RECIPE on top of the setting, builds MeanFlowSiT,
and trains with the times and the loss of `objective` below: irepa.py's one hook. (irepa.py imports
this file only then, inside its functions; run as a script, that loads irepa.py a second time, as
the module `irepa`, which MeanFlowSiT extends: nothing runs at import, so both copies agree.)
"""
import math
from functools import partial

import torch
import torch.nn as nn

from irepa import SiT, TimestepEmbedder, alignment_loss, interpolant, sample_time, xavier_linears

# MeanFlow's recipe, applied on top of any setting: the official ImageNet SiT-B/2 recipe
# (Gsunshine/meanflow configs/default.py): t and r ~ sigmoid(N(-0.4, 1)), a quarter of the batch
# with r != t, guidance trained in (omega 1, kappa 0.5: an effective scale 2), adaptive loss weight
# p 1, eps 0.01; AdamW betas (0.9, 0.95), no clipping; 1-step sampling. The network outputs u (no
# x-prediction).
RECIPE = dict(pred='v', time_dist=(-0.4, 1.0), betas=(0.9, 0.95), clip_grad=None,
              meanflow=dict(ratio=0.25, omega=1.0, kappa=0.5, p=1.0, eps=0.01),
              sampler=dict(mode='meanflow', num_steps=1))

class MeanFlowSiT(SiT):
    """SiT with a second time embedding, for the interval t - r, summed into the condition and
    initialised like t's (MeanFlow's DiT). model(x, t, y, interval) -> (u, h_proj);
    interval 0 (or None): the velocity."""
    def __init__(self, hidden_size=1152, target_dim=None, projector='mlp', proj_kernel=3, **kwargs):
        super().__init__(hidden_size=hidden_size, **kwargs)
        self.interval_embedder = xavier_linears(TimestepEmbedder(hidden_size))
        for layer in (self.interval_embedder.mlp[0], self.interval_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        self.add_projector(hidden_size, target_dim, projector, proj_kernel)

    def embed(self, x, t, y, interval=None):
        h, c = super().embed(x, t, y)
        interval = torch.zeros_like(t) if interval is None else interval
        return h, c + self.interval_embedder(interval)

    def forward(self, x, t, y, interval=None):
        return self.trunk(*self.embed(x, t, y, interval))

def meanflow_times(t, dropped, ratio, time_dist, generator):
    """MeanFlow's two times for the global batch, (B, 2): a second draw r from the same
    distribution, t, r = max, min; then r = t except for exactly B - int((1 - ratio) B) rows, drawn among
    those whose label was kept. (The official meanflow.py sets r = t on the first 1 - ratio of the
    rows and drops labels from the first rows: a dropped label never has r != t.)"""
    B, dev = len(t), t.device
    pick, u_r = torch.rand(2, B, device=dev, generator=generator)
    r = sample_time(u_r, torch.randn(B, device=dev, generator=generator), time_dist)
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    order = pick.masked_fill(dropped, math.inf).argsort()                      # kept labels first
    apart = torch.zeros(B, dtype=torch.bool, device=dev)
    apart[order[:B - int((1 - ratio) * B)]] = True
    apart &= ~dropped
    return torch.stack([t, torch.where(apart, r, t)], dim=1)                   # (B, 2): t, r

def meanflow_du_dt(model, x_t, t, r, y, v_g):
    """du/dt along the flow: the Jacobian-vector product of (x_t, t, r) -> u(x_t, t, y, t - r) with
    the tangents (v_g, 1, 0). Forward-mode AD on the plain module, never the DDP/compiled one (whose
    gradient all-reduce must not be bypassed; this is a target, so no gradient is needed). The fused
    attention kernels have no forward-mode AD, so attention runs the math kernel here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, du_dt = torch.func.jvp(lambda x, t, r: model(x, t, y, t - r)[0], (x_t, t, r),
                                  (v_g, torch.ones_like(t), torch.zeros_like(r)))
    return du_dt.float()

def meanflow_loss(model, x, y, noise, tr, target=None, *, raw_model, omega, kappa, p, eps):
    """MeanFlow's objective for one batch; tr (B, 2) holds t and r <= t (meanflow_times).
    Guidance is trained in:
        v_g = omega v + kappa u(x_t, t | y) + (1 - omega - kappa) u(x_t, t | null),
    v itself where the label was dropped. The target u_tgt = v_g - (t - r) du/dt is held fixed
    (stop-gradient); the loss per sample is the SUM of squares l, weighted by
    1 / stopgrad(l + eps)^p. u and the aligned hidden state come from one ordinary forward of
    `model` (the DDP one), so the alignment loss sees the pass that carries the gradient.
    Returns (loss, align) as flow_matching_loss."""
    t, r = tr.unbind(1)                                                         # (B,), (B,)
    x_t, v = interpolant(x, noise, t)
    with torch.no_grad():
        v_g = v
        # Both guidance passes in one batch.
        if omega != 1 or kappa != 0:
            null, zero = torch.full_like(y, raw_model.num_classes), torch.zeros_like(t)
            both = raw_model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]),
                             torch.cat([zero, zero]))
            u_c, u_u = both[0].float().chunk(2)
            dropped = (y == raw_model.num_classes).view(-1, 1, 1, 1)
            v_g = torch.where(dropped, v, omega * v + kappa * u_c + (1 - omega - kappa) * u_u)
        u_tgt = v_g - (t - r).view(-1, 1, 1, 1) * meanflow_du_dt(raw_model, x_t, t, r, y, v_g)
    u, h_proj = model(x_t, t, y, t - r)
    # A sum of squares per sample, not a mean.
    err = ((u.float() - u_tgt) ** 2).sum(dim=(1, 2, 3))                        # (B,)
    loss = (err / (err.detach() + eps) ** p).mean()                             # adaptive weight
    # With p = 1 the weighted loss is ~1 whatever the error: the value returned (and logged) is the
    # mean error, the gradient the weighted loss's.
    loss = loss - loss.detach() + err.detach().mean()
    align = alignment_loss(h_proj, target) if target is not None else torch.zeros_like(loss)
    return loss, align

def objective(args, raw_model):
    """irepa.py's hook: the loss, called as flow_matching_loss is, and the times, which turn the
    global batch's t (B,) into (B, 2) = (t, r) given which labels were dropped and the step's
    generator."""
    mf = args.meanflow
    loss = partial(meanflow_loss, raw_model=raw_model, omega=mf['omega'], kappa=mf['kappa'],
                   p=mf['p'], eps=mf['eps'])
    times = partial(meanflow_times, ratio=mf['ratio'], time_dist=args.time_dist)
    return loss, times
