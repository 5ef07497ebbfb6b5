"""
runs.py -- the run's machinery that irepa.py's training loop calls by name, and a first reading of
irepa.py can skip:
    bad input       one-line errors and warnings, range checks, nanoGPT's `--key=value` configurator,
                    the checks that run before anything heavy starts
    frozen networks downloads once a node, torch.hub's offline hints, DINOv3's gated weights, the
                    encoder's token grid, which CPUs compute bf16
    runs            run folders and the log, durable checkpoints written in the background, an exact
                    resume, and a clean stop on a scheduler's signal (preemption)
sample.py, metrics.py and prepare.py use the same errors and checks.
"""
import argparse
import ast
import contextlib
import glob
import json
import math
import os
import platform
import signal
import socket
import sys
import threading

import torch
import torch.distributed as dist

import vae

# -----------------------------------------------------------------------------
# Bad input: one-line errors, range checks, the configurator and the invariants checked before
# anything heavy starts

def fail(msg):
    """A one-line error for bad input, instead of a traceback from deep inside; named after the
    script that runs (irepa.py, sample.py, metrics.py), as argparse names its own errors. Under
    torchrun the line is one write, so two ranks' lines never run into each other."""
    line = f"{os.path.basename(sys.argv[0])}: error: {msg}"
    if int(os.environ.get('WORLD_SIZE', 1)) == 1:
        sys.exit(line)
    sys.stderr.flush()
    os.write(2, f"{line}\n".encode())
    sys.exit(1)

def fail_together(msg, group=None):
    """fail() on every rank of a torchrun job that met the same error at the same point (after a
    collective on `group`): each says the line before any exits (torchrun ends the others once one
    has exited), and the process group ends first (a rank that exits while holding it aborts)."""
    try:
        fail(msg)                           # says the line, then raises SystemExit
    finally:                                # on the way out: wait until every rank has said it
        if dist.is_initialized():
            dist.barrier(group)
            dist.destroy_process_group()

def warn(msg):
    """A warning as one line on stderr, named after the running script (warnings.warn would print
    the source line after it)."""
    print(f"{os.path.basename(sys.argv[0])}: warning: {msg}", file=sys.stderr, flush=True)

def call_or_fail(fn, *args):
    """fn(*args), with the errors the repo raises for bad input (no images, an unknown encoder, not
    a checkpoint, offline without the weights: ValueError, RuntimeError, FileNotFoundError) as one
    fail() line."""
    try:
        return fn(*args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        fail(str(e))

def check_ranges(args, bounds, recipe=()):
    """fail() at the first setting out of range. bounds {name: lo} means lo <= value,
    {name: (lo, hi)} means lo <= value <= hi; a value must be finite (NaN and inf fail), None is
    unset and passes. Names in `recipe` are recipe entries, not flags."""
    for name, b in bounds.items():
        (lo, hi), v = b if isinstance(b, tuple) else (b, math.inf), getattr(args, name)
        if v is not None and not (lo <= v <= hi and math.isfinite(v)):
            what = f"the recipe's {name}" if name in recipe else f"--{name.replace('_', '-')}"
            fail(f"{what} must be {f'>= {lo}' if hi == math.inf else f'in [{lo}, {hi}]'}, got {v}")

def output_dir_problem(path):
    """Creates the output folder `path`; returns why it cannot be one
    (a one-line reason), or None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file, not a folder"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return f"{path}: cannot create it ({e.strerror})"
    return None if os.access(path, os.W_OK) else f"{path} is not writable"


def configure(args, tokens, parser, recipes):
    """nanoGPT's configurator: --key=value sets any key of the configuration that has no flag of its
    own (ema_decay, spnorm_gamma, proj_kernel, hflip, ...), and --key.entry=value one entry of a
    dict (--sampler.num_steps=12). The value is a Python literal of a type the key has in some
    recipe or flag (an int where a float is; None where some recipe has None: --clip_grad=None);
    anything else fails with one line. `recipes`: the recipe dicts whose values give the types."""
    # A flag's type: its own, bool for a switch, else str.
    flag_types = {a.dest: a.type or (bool if a.nargs == 0 else str) for a in parser._actions}
    for tok in tokens:
        key, eq, text = tok.removeprefix('--').partition('=')
        name, _, entry = key.replace('-', '_').partition('.')
        if not (tok.startswith('--') and eq and hasattr(args, name)):
            fail(f"unrecognised argument {tok}: use a flag (--help) or --key=value with a key "
                 f"of the configuration: {', '.join(sorted(vars(args)))}")
        if entry and not isinstance(getattr(args, name), dict):
            fail(f"{tok}: {name} is not a dict; set it as --{name}=value")
        # A copy: never the recipe's dict.
        holder = dict(getattr(args, name)) if entry else vars(args)
        key = entry or name
        if key not in holder:
            fail(f"{tok}: {name} has no entry '{key}'")
        seen = [holder[key]] + [r[name].get(entry) if entry else r[name] for r in recipes
                                if name in r and (not entry or isinstance(r[name], dict))]
        types = {type(v) for v in seen if v is not None}
        if not entry and flag_types.get(name):
            types.add(flag_types[name])
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text                                                        # a plain string
        if types == {str} and value is not None and type(value) is not str:
            value = text                                        # a folder named 2024 is a name
        if float in types and type(value) is int:
            value = float(value)
        if tuple in types and type(value) is list:
            value = tuple(value)
        ok = type(value) in types or not types or (value is None and None in seen)
        if not ok:
            kinds = ' or '.join(sorted(t.__name__ for t in types)) + (' or None' if None in seen else '')
            fail(f"{tok}: {key} takes {kinds}, not {type(value).__name__} {value!r}")
        holder[key] = value
        if entry:
            setattr(args, name, holder)


def check_not_empty(args, names):
    """An empty path, as an unset shell variable gives, is an error, not 'not given'."""
    for name in names:
        if getattr(args, name) == '':
            fail(f"--{name.replace('_', '-')} is empty (an unset shell variable?)")

def numbers(t, n):
    return isinstance(t, tuple) and len(t) == n and all(type(v) in (int, float) for v in t)

def check_settings(args):
    """Every setting in range, and the output folder usable, before anything heavy starts."""
    check_not_empty(args, ('data_path', 'resume', 'hub_dir', 'results_dir'))
    check_ranges(args, dict(image_size=1, global_batch_size=1, grad_accum=1, max_steps=1,
                            ckpt_every=1, log_every=1, num_workers=0, seed=0, proj_coeff=0,
                            spnorm_gamma=(0, 1)), recipe=('spnorm_gamma', 'log_every'))
    if not 0 < args.lr < math.inf:
        fail(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.ema_decay < 1:
        fail(f"the recipe's ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.projector not in ('mlp', 'conv') or args.pred not in ('v', 'x'):
        fail(f"projector must be mlp or conv and pred v or x, got {args.projector} and {args.pred}")
    check_ranges(args, dict(proj_kernel=1, warmup_epochs=0), recipe=('proj_kernel', 'warmup_epochs'))
    if args.clip_grad is not None and not 0 <= args.clip_grad < math.inf:
        fail(f"the recipe's clip_grad must be >= 0 (0 or None: no clipping), got {args.clip_grad}")
    if not (numbers(args.betas, 2) and all(0 <= b < 1 for b in args.betas)):
        fail(f"the recipe's betas must be two numbers in [0, 1) (AdamW's), got {args.betas}")
    if args.time_dist is not None and not (numbers(args.time_dist, 2) and math.isfinite(args.time_dist[0])
                                            and 0 < args.time_dist[1] < math.inf):
        fail(f"the recipe's time_dist must be None (uniform t) or (mean, std > 0) of a logit-normal t, "
             f"got {args.time_dist}")
    if args.vae not in (None, 'sd-vae-ft-mse'):
        fail(f"the recipe's vae must be 'sd-vae-ft-mse' (latent) or None (pixels), got {args.vae!r}")
    if (problem := sampler_problem(args.sampler, args.objective)):
        fail(f"the recipe's sampler {args.sampler}: {problem}")
    if args.objective == 'meanflow':
        check_ranges(argparse.Namespace(**args.meanflow),
                     dict(ratio=(0, 1), omega=-math.inf, kappa=-math.inf, p=0, eps=0),
                     recipe=('ratio', 'omega', 'kappa', 'p', 'eps'))
        # Else the weight is 1 / (0 + 0)^p on an exact fit.
        if args.meanflow['p'] > 0 and args.meanflow['eps'] == 0:
            fail("the recipe's eps must be > 0 when p > 0 (the loss weight is 1 / (error + eps)^p)")
    if not args.resume and (problem := output_dir_problem(args.results_dir)):
        fail(f"--results-dir {problem}")

def sampler_problem(sampler, objective):
    """Why a recipe's sampler (sample.py's defaults for the run) cannot sample, or None."""
    if not isinstance(sampler, dict) or not {'mode', 'num_steps'} <= set(sampler) \
            or set(sampler) - {'mode', 'num_steps', 'cfg_scale', 'heun'}:
        return "it must be a dict of mode, num_steps and optionally cfg_scale and (ode) heun"
    mode, steps, cfg = sampler['mode'], sampler['num_steps'], sampler.get('cfg_scale', 1.0)
    if mode not in ('sde', 'ode', 'meanflow') or (mode == 'meanflow' and objective != 'meanflow'):
        return f"mode must be sde, ode or (--objective meanflow) meanflow, got {mode!r}"
    if type(steps) is not int or steps < 1:
        return f"num_steps must be an int >= 1, got {steps!r}"
    if type(cfg) not in (int, float) or not 1 <= cfg < math.inf:
        return f"cfg_scale must be >= 1 (1: no guidance), got {cfg!r}"
    if sampler.get('heun') and mode != 'ode':
        return "heun is for mode ode"
    return None

def check_batch_split(args, world):
    if args.global_batch_size % (world * args.grad_accum):
        fail(f"--global-batch-size {args.global_batch_size} is not divisible by world size {world} "
             f"x --grad-accum {args.grad_accum}")

def check_model(args, size_cfg, encoders):
    """The model-shape invariants, before anything heavy starts: size_cfg is the model size's
    keywords (patch_size, depth, ...), encoders the known names. Returns the model's patch size."""
    patch, depth = size_cfg['patch_size'], size_cfg['depth']
    if args.encoder not in encoders + ('none',) and not args.hub_dir:
        fail(f"unknown encoder '{args.encoder}'; choose one of: {', '.join(encoders)}, none, "
             f"or an entry of the hubconf.py in --hub-dir")
    # The SD-VAE downsamples by 8.
    token_px = 8 ** bool(args.vae) * patch
    if args.image_size % token_px:
        fail(f"--image-size {args.image_size} is not divisible by the patch size of {args.model}"
             + (" x 8 (the VAE's downsampling)" if args.vae else ""))
    if args.encoder != 'none' and args.spatial_norm and (args.image_size // token_px) ** 2 < 2:
        fail(f"{args.model} at {args.image_size} px has one token: the spatial norm's statistics "
             f"over tokens need 2; raise --image-size, or use a smaller patch")
    if args.encoder_depth is not None and not 1 <= args.encoder_depth <= depth:
        fail(f"--encoder-depth {args.encoder_depth} is outside 1..{depth}, "
             f"the blocks of {args.model}")
    if args.proj_kernel % 2 == 0:
        fail(f"the recipe's proj_kernel must be odd (a 'same' conv on the token grid), "
             f"got {args.proj_kernel}")
    return patch


# -----------------------------------------------------------------------------
# Frozen networks: downloads once a node, torch.hub offline, the encoder's grid, bf16 CPUs

@contextlib.contextmanager
def node_first(world):
    """The first process of each node runs the block, then the node's others do (every process
    passes one barrier): a download into a node's cache (torch.hub, the VAE) happens once a node."""
    first = int(os.environ.get('LOCAL_RANK', 0)) == 0
    if world > 1 and not first:
        dist.barrier()
    yield
    if world > 1 and first:
        dist.barrier()

HUB_INTERFACE = ("DINOv2's interface (.embed_dim, .patch_size, and "
                 "forward_features(x)['x_norm_patchtokens'] of shape (B, tokens, embed_dim)), "
                 "which a --hub-dir entry needs")

def hub_patch_size(model, name):
    """The input pixels per token side of a hub encoder (DINOv1 keeps it on patch_embed); a
    --hub-dir entry without DINOv2's interface fails here with one line."""
    patch_embed = getattr(model, 'patch_embed', None)
    p = getattr(model, 'patch_size', 0) or getattr(patch_embed, 'patch_size', 0)
    if not (p and hasattr(model, 'embed_dim')):
        raise RuntimeError(f"encoder '{name}' ({type(model).__name__}) lacks {HUB_INTERFACE}")
    return p

# DINOv3's weights are gated (granted on request, facebookresearch/dinov3's README): the file a
# download gives, looked for beside the other hub weights.
DINOV3_WEIGHTS = {'dinov3_vits16': 'dinov3_vits16_pretrain_lvd1689m-08c60483.pth',
                  'dinov3_vitb16': 'dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth',
                  'dinov3_vitl16': 'dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth'}

def gated_weights(name):
    """torch.hub.load's keywords for encoder `name`: DINOv3's weights file, which must be in the
    hub's checkpoints folder already."""
    if name not in DINOV3_WEIGHTS:
        return {}
    checkpoints = os.path.join(torch.hub.get_dir(), 'checkpoints')
    path = os.path.join(checkpoints, DINOV3_WEIGHTS[name])
    if not os.path.isfile(path):
        raise RuntimeError(f"encoder '{name}': DINOv3's weights are gated; request them "
                           f"(facebookresearch/dinov3's README) and put {DINOV3_WEIGHTS[name]} "
                           f"in {checkpoints} (set TORCH_HOME to move it)")
    return dict(weights=path)

@contextlib.contextmanager
def hub_errors(name, hub_repo, local, github):
    """Around torch.hub.load of encoder `name`: a 60 s socket timeout (a stalled network fails
    instead of hanging), and a failure as one line with the offline hint that fits."""
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        yield
    except Exception as e:
        cached = os.path.join(torch.hub.get_dir(), github.replace('/', '_') + '_main')
        checkpoints = os.path.join(torch.hub.get_dir(), 'checkpoints')
        if hub_repo is None:
            hint = (f"Offline? Put the {github} repo in {cached} and its weights in {checkpoints}, "
                    f"or pass --hub-dir DIR (a folder with hubconf.py).")
        elif not os.path.isfile(os.path.join(hub_repo, 'hubconf.py')):
            hint = "--hub-dir must be a folder with hubconf.py."
        elif 'Cannot find callable' in str(e):                 # torch.hub's words for no entry
            hint = f"Is '{name}' an entry of {os.path.join(hub_repo, 'hubconf.py')}?"
        else:
            hint = f"Offline? The weights go in {checkpoints}."
        raise RuntimeError(f"could not load encoder '{name}' through torch.hub from "
                           f"{local or 'github ' + github} ({type(e).__name__}: {e}). {hint}") from e
    finally:
        socket.setdefaulttimeout(old_timeout)

def cpu_has_bf16():
    """Native bf16 matmuls: x86 AVX512-BF16 or AMX, or Arm's BF16 (Linux /proc/cpuinfo flags)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {'avx512_bf16', 'amx_bf16', 'bf16'})

def check_encoder(args, encoder, grid, device, known):
    """A --hub-dir entry may be anything: it must run on a blank image and give SiT's token grid
    (grid x grid). `known`: the encoders of the paper, whose errors are not bad input."""
    try:
        with torch.no_grad():
            blank = torch.zeros(1, 3, args.image_size, args.image_size, device=device)
            T = encoder(blank).shape[1]
    except Exception as e:
        if args.encoder in known or isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        fail(f"encoder {args.encoder} failed on a blank image ({type(e).__name__}: {e}); "
             f"does it have {HUB_INTERFACE}?")
    if T != grid * grid:
        fail(f"encoder {args.encoder} gives {T} tokens but {args.model} at {args.image_size} px has a "
             f"{grid}x{grid} grid; change --image-size or --model so the grids match")

def frozen_networks(args, dataset, grid, device, world, load_encoder, known):
    """The SD-VAE (latent setting; from a prepared folder only its latent statistics) and the
    alignment encoder (irepa.load_encoder), or None, each downloaded once a node, with one-line
    errors; the encoder's token grid must be SiT's."""
    sd_vae = encoder = None
    with node_first(world):
        if args.vae:
            sd_vae = call_or_fail(vae.SDVAE, device, getattr(dataset, 'latent_stats', None))
        if args.encoder != 'none':
            encoder = call_or_fail(load_encoder, args.encoder, grid, args.hub_dir, device)
    if encoder is not None:
        check_encoder(args, encoder, grid, device, known)
    return sd_vae, encoder

# -----------------------------------------------------------------------------
# Runs: names, the log, atomic checkpoints in the background and an exact resume (a resume
# continues the run with its own settings)

def derive_args(args, dataset, encoder, world, precision, size_cfg):
    """The values the configuration gets at start, from the data, the encoder, the machine and the
    model size's keywords (REPA's encoder_depth per size)."""
    args.num_classes = len(dataset.classes)
    args.class_names = list(dataset.classes)
    args.num_images = len(dataset)
    if args.encoder_depth is None:
        args.encoder_depth = size_cfg['encoder_depth']
    args.target_dim = encoder.embed_dim if encoder is not None else None
    args.method = method_name(args)
    args.world_size = world
    args.precision = precision

def method_name(args):
    """What is trained, in words: 'vanilla' (plain SiT), 'repa', 'irepa', or one of iREPA's halves
    ('conv-only': conv projector on raw targets; 'spnorm-only': REPA's MLP on spatially
    normalised targets)."""
    if args.encoder == 'none':
        return 'vanilla'
    return {('mlp', False): 'repa', ('conv', True): 'irepa', ('conv', False): 'conv-only',
            ('mlp', True): 'spnorm-only'}[args.projector, bool(args.spatial_norm)]

def run_name(args):
    """<setting>-<model>-<encoder>-<method>, e.g.
    latent-SiT-XL-2-dinov2_vitb14-irepa, demo-SiT-T-4-vanilla."""
    target = '' if args.encoder == 'none' else f"{args.encoder}-"
    objective = '-meanflow' if args.objective == 'meanflow' else ''
    return f"{args.setting}-{args.model.replace('/', '-')}-{target}{method_name(args)}{objective}"

def new_run_dir(args, master, world):
    """results_dir/<run name>, with -1, -2, ... if taken; made by rank 0 (os.makedirs fails on a
    folder that exists, so two runs started at once never share one)."""
    run_dir = name = os.path.join(args.results_dir, run_name(args))
    i = 0
    while master:
        try:
            os.makedirs(run_dir)
            break
        except FileExistsError:
            i += 1
            run_dir = f"{name}-{i}"
    if world > 1:
        obj = [run_dir]
        dist.broadcast_object_list(obj, src=0)
        run_dir = obj[0]
    return run_dir

class Logger:
    """print + append to <run>/log.txt, on rank 0 only (which also makes the run's checkpoints/
    folder). An append that fails (a full disk) is said once, and the run goes on printing."""
    def __init__(self, run_dir, active):
        self.path, self.active, self.failed = os.path.join(run_dir, 'log.txt'), active, False
        if active:
            os.makedirs(os.path.join(run_dir, 'checkpoints'), exist_ok=True)

    def __call__(self, msg):
        if not self.active:
            return
        print(msg, flush=True)
        try:
            with open(self.path, 'a') as f:
                f.write(msg + '\n')
        except OSError as e:
            if not self.failed:
                warn(f"cannot append to {self.path} ({e.strerror}); the log goes on, on stdout only")
            self.failed = True

def log_start(log, args, run_args, model, dataset, step, run_dir, setting_pred):
    """Provenance (versions, device, precision, parameters), every resolved setting,
    and what this run is. setting_pred: the prediction of the setting's recipe."""
    device = next(model.parameters()).device
    log(f"provenance: torch {torch.__version__} | cuda {torch.version.cuda} | python {platform.python_version()} | "
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type} x "
        f"{args.world_size} | precision {args.precision} | encoder {args.encoder} | "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M params")
    log(f"args: {json.dumps(vars(args))}")
    log(f"run: {args.setting} setting, {args.model}, {args.method}"
        + (f" with the {args.encoder} target" if args.encoder != 'none' else '')
        + f" | {len(dataset)} images, {len(dataset.classes)} classes | {'resuming at' if step else 'starting at'} "
          f"step {step} | {run_dir}")
    if step >= args.max_steps:
        log(f"note: the run is at step {step}, at or past --max-steps {args.max_steps}: nothing to train")
    if args.objective == 'meanflow' and setting_pred != args.pred:
        log(f"note: MeanFlow's network outputs the average velocity u: the {args.setting} setting's "
            f"{setting_pred}-prediction does not apply")
    if run_args is not None and run_args['precision'] != args.precision:
        log(f"note: the run trained in {run_args['precision']} until now and goes on in {args.precision} "
            f"(IREPA_PRECISION or the machine): not bit-identical to a run without the break")

def write_atomic(path, write):
    """write(f) into a temporary file, flushed to the disk, then renamed to `path`, and the rename
    flushed too: a kill or a crash never leaves a partial file under the real name, nor a power
    loss a file of zeros. A failed write removes its temporary file at once (a full disk gets its
    space back)."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    folder = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)

def save_checkpoint(path, ckpt):
    write_atomic(path, lambda f: torch.save(ckpt, f))

def save_run(log, run_dir, step, model, ema, opt, args, master, last=False):
    """The checkpoint <run>/checkpoints/<step>.pt: model, EMA, optimizer, args, step; atomically, by
    rank 0, and never with non-finite weights. Rank 0 copies the state to host memory and writes it
    in a background thread while training goes on (one save at a time: the next waits for it), so
    slow storage holds no rank. A save that fails is logged at once and training goes on (the next
    save tries again); the run waits for its last one, which must succeed."""
    if not all(torch.isfinite(p).all() for p in [*model.parameters(), *ema.parameters()]):
        fail_together(f"non-finite weights at step {step}; not saving. Any checkpoint in "
                      f"{run_dir}/checkpoints was saved before it")           # the same on every rank
    if master:
        state = host_copy(dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                               args=vars(args), step=step))
        wait_for_save()
        path = os.path.join(run_dir, 'checkpoints', f"{step:07d}.pt")
        SAVING['thread'] = threading.Thread(target=background_save, args=(path, state, log, last))
        SAVING['thread'].start()

SAVING = dict(thread=None, error=None)       # the save in flight, and how it failed

def host_copy(obj):
    """A copy of a (nested) state dict with every tensor in host memory, detached from training."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj

def background_save(path, state, log, last):
    SAVING['error'] = None
    try:
        save_checkpoint(path, state)
        log(f"saved {path}")
    except Exception as e:
        cause = e.__context__ if isinstance(e.__context__, OSError) else e     # a full disk, under
        SAVING['error'] = f"could not save {path} ({type(cause).__name__}: {cause})"  # torch's error
        if not last:                                        # the last one's failure stops the run
            log(f"warning: {SAVING['error']}; training goes on, the next checkpoint tries again")

def stop_diverged(loss, grad_norm, step, run_dir):
    """Every rank stops alike when the loss or the gradient norm (all-reduced, so the same on every
    rank) is not finite."""
    fail_together(f"loss {loss:.4g}, gradient norm {grad_norm:.4g} at step {step}: stopping. Any "
                  f"checkpoint in {run_dir}/checkpoints was saved before it went bad; a new run "
                  f"with a lower --lr may help")

def wait_for_save(last=False, group=None):
    """Waits for the save in flight. After the run's last save every rank learns (through `group`,
    the ranks' CPU group) whether rank 0's write succeeded, and a failure stops them all with one
    line."""
    if SAVING['thread'] is not None:
        SAVING['thread'].join()
        SAVING['thread'] = None
    if not last:
        return
    failed = torch.tensor([SAVING['error'] is not None], dtype=torch.int32)
    if group is not None:
        dist.all_reduce(failed, dist.ReduceOp.MAX, group)
    if failed:
        fail_together(SAVING['error'] or "rank 0 could not save the run's last checkpoint (its log "
                      "says why)", group)

class Preemption:
    """Stopping on a scheduler's signal without losing the run: SIGTERM (SLURM, Kubernetes), SIGUSR1
    (SLURM's --signal), SIGHUP and SIGINT (Ctrl-C; a second one interrupts at once) only set a flag.
    Each step every rank sends its flag into a small all-reduce (max) on a CPU group and reads the
    one it sent the step before, so no rank waits on the GPU, and all ranks stop after the same step
    (one process: the step it is in; ranks: the next) even when the signal reached one. `stop()`
    once a step: the signal to stop on, or 0."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)
    current = None                                      # the run's, for end_run()

    def __init__(self, world):
        self.got, self.agreed, self.world, self.pending = 0, 0, world, None
        self.group = dist.new_group(backend='gloo') if world > 1 else None
        main = threading.current_thread() is threading.main_thread()   # where handlers can be set
        self.old = {s: signal.signal(s, self.handler) for s in self.SIGNALS} if main else {}
        Preemption.current = self

    def handler(self, signum, frame):
        if self.got and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.got = self.got or signum

    def stop(self):
        if self.world == 1:
            self.agreed = self.got
            return self.agreed
        if self.pending is not None:
            work, flag = self.pending
            work.wait()                                 # sent a step ago: long arrived
            self.agreed = int(flag)
        flag = torch.tensor([self.got], dtype=torch.int32)
        self.pending = dist.all_reduce(flag, dist.ReduceOp.MAX, self.group, async_op=True), flag
        return self.agreed

    def close(self, wait=True):
        """The handlers as they were; `wait` for the last all-reduce (every rank has sent as many),
        except where a rank may be gone."""
        if wait and self.pending is not None:
            self.pending[0].wait()
        for s, old in self.old.items():
            signal.signal(s, old)
        self.old, Preemption.current = {}, None

def end_run():
    """However a run ended (fail() included): its save in flight written, the signal handlers as
    they were, nothing left over for another run in this process."""
    if SAVING['thread'] is not None:
        SAVING['thread'].join()
    SAVING.update(thread=None, error=None)
    if Preemption.current is not None:
        Preemption.current.close(wait=False)
    if dist.is_initialized():                           # (a fail() skipped train's own)
        dist.destroy_process_group()

def worker_init(worker_id):
    """DataLoader workers ignore the stop signals, which SLURM sends to every process of a job
    step: the main process stops, then shuts its workers down."""
    for s in Preemption.SIGNALS:
        signal.signal(s, signal.SIG_IGN)

def log_stop(log, signum, step, run_dir, rank):
    """Every process's one line after a stop on a signal."""
    msg = (f"stopped on {signal.Signals(signum).name} after step {step}, saved in "
           f"{os.path.join(run_dir, 'checkpoints', f'{step:07d}.pt')}; go on with --resume {run_dir}")
    log(msg) if rank == 0 else print(f"rank {rank}: {msg}", flush=True)

def checkpoints(run_dir):
    """A run's checkpoint files <step>.pt, oldest first (by step:
    10000000.pt comes after 9999999.pt)."""
    step = lambda path: int(name) if (name := os.path.basename(path)[:-3]).isdigit() else -1
    return sorted(glob.glob(os.path.join(run_dir, 'checkpoints', '*.pt')), key=step)

def latest_checkpoint(run_dir):
    return (checkpoints(run_dir) or [None])[-1]

def load_latest_checkpoint(run_dir):
    """The newest checkpoint of a run that loads; a truncated or corrupt one (a disk fault, a copy
    cut short) is skipped with a warning naming it, and leftovers of a save that was killed
    (*.tmp) are removed."""
    for tmp in glob.glob(os.path.join(run_dir, 'checkpoints', '*.tmp')):
        # Another rank removed it first.
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    for path in reversed(checkpoints(run_dir)):
        try:
            # weights_only: tensors and plain types. Memory-mapped: the weights and AdamW's moments
            # are read as the model and optimizer copy them, not held whole by every rank.
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except Exception as e:
            warn(f"skipping unreadable checkpoint {path} ({type(e).__name__}); trying the one before")
    fail(f"--resume {run_dir}: no readable checkpoint in {os.path.join(run_dir, 'checkpoints')}")

# What --resume may change (the schedule, the machine and how it splits the batch, where the data
# and hub copies live); every other setting comes from the checkpoint, so the run continues
# as it began.
RESUME_FLAGS = ('max_steps', 'ckpt_every', 'log_every', 'num_workers', 'compile', 'hub_dir', 'data_path',
                'grad_accum', 'resume')

def resume(args, argv, parser):
    """--resume RUN -> (the run's own settings with the RESUME_FLAGS given on the command line,
    the run's newest readable checkpoint)."""
    if os.path.isfile(args.resume):
        fail(f"--resume takes the run's folder, not a checkpoint: --resume "
             f"{os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))}")
    ckpt = load_latest_checkpoint(args.resume)
    return resume_args(args, given_keys(argv, parser), ckpt['args'], parser), ckpt

def given_keys(argv, parser):
    """The settings named on the command line, by flag or as --key=value, a dict's entry as
    key.entry (abbreviations are off, so every flag is spelled out)."""
    dest = {opt: a.dest for a in parser._actions for opt in a.option_strings}
    keys = set()
    for tok in argv:
        opt = tok.split('=')[0]
        if opt in dest:
            keys.add(dest[opt])
        # A --key=value or --key.entry=value.
        elif tok.startswith('--') and '=' in tok:
            keys.add(opt[2:].replace('-', '_'))
    return keys

def resume_args(args, given, run_args, parser):
    """The run's own settings, with the RESUME_FLAGS named on the command line. A flag that would
    change the training itself is refused."""
    flags = {a.dest for a in parser._actions if a.option_strings}
    shown = lambda k: f"--{k.replace('_', '-')}" if k in flags else f"--{k}"   # a flag, or a key
    if missing := sorted(set(vars(args)) - set(run_args) - {'meanflow'}):
        fail(f"--resume {args.resume}: its checkpoint has no {', '.join(missing)}: an older irepa.py "
             f"wrote it; resume it with the commit that wrote it")
    for k in sorted(given - set(RESUME_FLAGS)):
        name, _, entry = k.partition('.')                   # an entry: only it is compared
        run, now = run_args.get(name), getattr(args, name)
        if entry:
            run, now = (run or {}).get(entry), now.get(entry)
        if name in run_args and run != now:
            fail(f"--resume continues the run as it began, but {shown(k)} {now} differs "
                 f"from the run's {run}; only {', '.join(map(shown, RESUME_FLAGS[:-1]))} may "
                 f"change (start a new run to change the rest)")
    return argparse.Namespace(**{**run_args, **{k: getattr(args, k) for k in given & set(RESUME_FLAGS)}})

