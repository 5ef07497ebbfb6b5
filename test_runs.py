"""runs.py: one-line errors and range checks, the configurator, checkpoints, background saves and resume."""
import argparse
import contextlib
import copy
import errno
import gc
import glob
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import data
import irepa
import runs
from test_irepa import HERE, RECIPE_DEMO_SAMPLER, TRAIN, load_last, make_folder, run_train, torchrun_command

def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    (tmp_path / 'checkpoints').mkdir()
    for name in ('9999999.pt', '10000000.pt', '0000050.pt', 'notes.pt'):
        (tmp_path / 'checkpoints' / name).write_bytes(b'')
    assert [os.path.basename(p) for p in runs.checkpoints(str(tmp_path))] == [
        'notes.pt', '0000050.pt', '9999999.pt', '10000000.pt']
    assert runs.latest_checkpoint(str(tmp_path)).endswith('10000000.pt')

def test_exact_resume_is_bit_identical(tmp_path):
    straight = run_train(tmp_path / 'a', '--encoder', 'hog', '--irepa', '--max-steps', '4', '--ckpt-every', '2')
    half = run_train(tmp_path / 'b', '--encoder', 'hog', '--irepa', '--max-steps', '2', '--ckpt-every', '2')
    resumed = irepa.main(['--resume', half, '--max-steps', '4', '--num-workers', '0'])            # the rest comes from the checkpoint
    assert resumed == half
    a, b = load_last(straight), load_last(resumed)
    assert a['step'] == b['step'] == 4
    for part in ('model', 'ema'):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert 'resuming at step 2' in open(os.path.join(resumed, 'log.txt')).read()

@pytest.mark.parametrize('extra, message', [
    (['--data-path', '/no/such/folder'], 'is not a folder'),
    (['--data-path', 'EMPTY'], 'no images in'),
    (['--image-size', '18'], 'not divisible by the patch size'),
    (['--model', 'SiT-Q/2'], "invalid choice: 'SiT-Q/2'"),
    (['--encoder', 'clip'], "unknown encoder 'clip'"),
    (['--grad-accum', '3'], 'not divisible by world size 1 x --grad-accum 3'),
    (['--grad-accum', '0'], '--grad-accum must be >= 1'),
    (['--encoder-depth', '7'], '--encoder-depth 7 is outside 1..6'),
    (['--resume', 'NOCKPT'], 'no readable checkpoint in'),
    (['--lr', '0'], '--lr must be > 0, got 0.0'),
    (['--lr', 'nan'], '--lr must be > 0, got nan'),
    (['--max-steps', '0'], '--max-steps must be >= 1'),
    (['--ckpt-every', '0'], '--ckpt-every must be >= 1'),
    (['--log_every=-5'], "the recipe's log_every must be >= 1"),
    (['--num-workers', '-1'], '--num-workers must be >= 0'),
    (['--global-batch-size', '0'], '--global-batch-size must be >= 1'),
    (['--image-size', '0'], '--image-size must be >= 1'),
    (['--proj-coeff', '-1'], '--proj-coeff must be >= 0'),
    (['--seed', '-3'], '--seed must be >= 0'),
    (['--resume', ''], '--resume is empty (an unset shell variable?)'),
    (['--data-path', ''], '--data-path is empty'),
    (['--hub-dir', ''], '--hub-dir is empty'),
    (['--results-dir', 'AFILE'], 'cannot create it'),
    (['--encoder', 'dinov2_vitb14', '--hub-dir', 'HUB', '--image-size', '32'], 'gives 4 tokens but SiT-T/4 at 32 px'),
    (['--encoder', 'dinov2_vits14', '--hub-dir', 'NOHUB'], 'could not load encoder'),
    (['--encoder', 'typo_name', '--hub-dir', 'HUB'], "Is 'typo_name' an entry of"),
    (['--encoder', 'offline_entry', '--hub-dir', 'HUB'], 'name resolution>). Offline? The weights go in'),
    (['--encoder', 'not_an_encoder', '--hub-dir', 'HUB'], "encoder 'not_an_encoder' (Sequential) lacks DINOv2's"),
    (['--encoder', 'wrong_output', '--hub-dir', 'HUB'], 'wrong_output failed on a blank image (TypeError'),
    (['--encoder', 'hog', '--irepa', '--image-size', '4'], "SiT-T/4 at 4 px has one token: the spatial norm's"),
])
def test_bad_input_gives_a_clear_error(tmp_path, hub_dir, capsys, extra, message):
    (tmp_path / 'empty' / 'c').mkdir(parents=True)
    (tmp_path / 'nockpt').mkdir()
    (tmp_path / 'afile').write_text('not a folder')
    subs = {'EMPTY': str(tmp_path / 'empty'), 'NOCKPT': str(tmp_path / 'nockpt'), 'HUB': hub_dir,
            'NOHUB': str(tmp_path), 'AFILE': str(tmp_path / 'afile' / 'sub')}
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / 'r', '--encoder', 'none', *[subs.get(a, a) for a in extra])
    err = str(e.value.code) + capsys.readouterr().err
    assert message in err and 'Traceback' not in err

def test_check_ranges_bounds_are_inclusive_and_finite():
    ok = lambda **kw: runs.check_ranges(argparse.Namespace(**kw), dict(n=1, g=(0, 1)), recipe=('g',)) is None
    assert ok(n=1, g=0) and ok(n=10 ** 9, g=1.0) and ok(n=None, g=None)     # bounds included, None is unset
    for kw, msg in ((dict(n=0, g=0.5), '--n must be >= 1, got 0'), (dict(n=1, g=1.01), "the recipe's g must be in [0, 1]"),
                    (dict(n=math.inf, g=0.5), '--n must be >= 1, got inf'), (dict(n=1, g=math.nan), 'got nan')):
        with pytest.raises(SystemExit, match=re.escape(msg)):
            ok(**kw)

@pytest.mark.parametrize('entry, value, msg', [('ema_decay', 1.0, "the recipe's ema_decay must be in [0, 1), got 1.0"),
                                               ('spnorm_gamma', 1.5, "the recipe's spnorm_gamma must be in [0, 1]"),
                                               ('proj_kernel', 0, "the recipe's proj_kernel must be >= 1, got 0"),
                                               ('proj_kernel', 2, "the recipe's proj_kernel must be odd"),
                                               ('projector', "'linear'", "projector must be mlp or conv"),
                                               ('clip_grad', -1, "the recipe's clip_grad must be >= 0 (0 or None:"),
                                               ('clip_grad', '1e999', "the recipe's clip_grad must be >= 0"),
                                               ('warmup_epochs', -1, "the recipe's warmup_epochs must be >= 0"),
                                               ('betas', '[0.9]', "the recipe's betas must be two numbers in [0, 1)"),
                                               ('betas', '(0.9,2.0)', "the recipe's betas must be two numbers"),
                                               ('time_dist', '(0.1,)', "the recipe's time_dist must be None (uniform"),
                                               ('time_dist', "('a','b')", "the recipe's time_dist must be None"),
                                               ('time_dist', '(0.8,0)', "the recipe's time_dist must be None"),
                                               ('vae', "'foo'", "the recipe's vae must be 'sd-vae-ft-mse' (latent)"),
                                               ('sampler.num_steps', -5, "num_steps must be an int >= 1, got -5"),
                                               ('sampler.cfg_scale', 0.5, "cfg_scale must be >= 1 (1: no guidance)"),
                                               ('sampler.mode', "'bogus'", "mode must be sde, ode or (--objective"),
                                               ('sampler.mode', "'meanflow'", "mode must be sde, ode or (--objective"),
                                               ('sampler.mode', "'sde'", "heun is for mode ode"),
                                               ('sampler', '{}', "it must be a dict of mode, num_steps")])
def test_recipe_entries_are_range_checked(tmp_path, entry, value, msg):
    with pytest.raises(SystemExit, match=re.escape(msg)):
        run_train(tmp_path, '--encoder', 'none', f'--{entry}={value}')

def test_a_string_key_keeps_its_text():
    """A folder named 2024 (or 1e3) is a name: a key whose flag or recipe value is a string keeps the text given."""
    a = irepa.get_args(['--setting', 'demo', '--data_path=2024', '--hub_dir=1e3', '--results_dir=007'])
    assert (a.data_path, a.hub_dir, a.results_dir) == ('2024', '1e3', '007')

def test_a_resume_past_max_steps_says_there_is_nothing_to_train(tmp_path):
    run = run_train(tmp_path, '--encoder', 'none', '--max-steps', '3')
    irepa.main(['--resume', run, '--max-steps', '2'])
    log = open(os.path.join(run, 'log.txt')).read()
    assert 'note: the run is at step 3, at or past --max-steps 2: nothing to train' in log
    assert runs.latest_checkpoint(run).endswith('0000003.pt')

def test_any_recipe_key_is_set_as_key_value(tmp_path):
    """nanoGPT's configurator: --key=value for a key without a flag, a dict's entry as --key.entry=value, the value
    a literal of the recipe value's type (an int for a float); the recipes themselves are never written."""
    before = copy.deepcopy(irepa.RECIPES)
    a = irepa.get_args(['--setting', 'demo', '--spnorm_gamma=0.8', '--ema-decay=1', '--proj_kernel=5',
                        '--sampler.num_steps=12', '--hflip=True', '--time_dist=(0.8, 0.8)', '--betas=[0.9, 0.95]'])
    assert (a.spnorm_gamma, a.ema_decay, a.proj_kernel, a.hflip, a.time_dist, a.betas) == (0.8, 1.0, 5, True,
                                                                                         (0.8, 0.8), (0.9, 0.95))
    assert type(a.ema_decay) is float and a.sampler == dict(RECIPE_DEMO_SAMPLER, num_steps=12)
    # iREPA's halves on their own (iREPA Table 2's ablation): explicit entries win over --irepa
    b = irepa.get_args(['--setting', 'demo', '--irepa', '--projector=mlp'])
    assert (b.projector, b.spatial_norm) == ('mlp', True)
    c = irepa.get_args(['--setting', 'demo', '--no-irepa', '--projector=conv', '--spatial_norm=False'])
    assert (c.projector, c.spatial_norm, runs.method_name(c)) == ('conv', False, 'conv-only')
    assert irepa.RECIPES == before
    d = irepa.get_args(['--setting', 'latent', '--clip_grad=None', '--proj_coeff=1.0', '--encoder_depth=6'])
    assert (d.clip_grad, d.proj_coeff, d.encoder_depth) == (None, 1.0, 6)     # None and float: other recipes' types
    assert d.sampler is not irepa.RECIPES['latent']['sampler']                  # a copy of the recipe's dict
    for argv, msg in ((['--ema_decay=high'], "--ema_decay=high: ema_decay takes float, not str 'high'"),
                      (['--hflip=1'], "hflip takes bool, not int 1"),
                      (['--encoder_depth=abc'], "encoder_depth takes int or None, not str 'abc'"),
                      (['--time_dist=0.5'], "time_dist takes tuple or None, not float 0.5"),
                      (['--sampler.steps=3'], "--sampler.steps=3: sampler has no entry 'steps'"),
                      (['--lr.x=1'], "--lr.x=1: lr is not a dict"),
                      (['--nonsense=3'], "unrecognised argument --nonsense=3: use a flag (--help) or --key=value"),
                      (['--max-steps', '7', '--ema_decay', '0.9'], "unrecognised argument --ema_decay: use a flag")):
        with pytest.raises(SystemExit, match=re.escape(msg)):
            irepa.get_args(['--setting', 'demo'] + argv)

def test_resume_refuses_a_changed_recipe_key(tmp_path):
    run = run_train(tmp_path, '--encoder', 'hog', '--irepa', '--max-steps', '1', '--ema_decay=0.9')
    with pytest.raises(SystemExit, match=re.escape("--resume continues the run as it began, but --ema_decay 0.5")):
        irepa.main(['--resume', run, '--max-steps', '2', '--ema_decay=0.5'])
    irepa.main(['--resume', run, '--max-steps', '2', '--ema_decay=0.9'])            # the same value: fine
    ck = load_last(run)
    assert ck['step'] == 2 and ck['args']['ema_decay'] == 0.9
    # A dict's entry is compared alone (the command line's dict starts from the default setting's, not the run's).
    with pytest.raises(SystemExit, match=re.escape("but --sampler.cfg_scale 2.0 differs from the run's 4.0;")):
        irepa.main(['--resume', run, '--max-steps', '3', '--sampler.cfg_scale=2.0'])
    irepa.main(['--resume', run, '--max-steps', '3', '--sampler.cfg_scale=4.0'])
    assert load_last(run)['args']['sampler'] == RECIPE_DEMO_SAMPLER

@pytest.mark.parametrize('script', ['irepa.py', 'sample.py', 'metrics.py'])
def test_errors_are_one_line_named_after_the_running_script(monkeypatch, script):
    monkeypatch.setattr(sys, 'argv', [f'/some/where/{script}', '--flag'])
    with pytest.raises(SystemExit) as e:
        runs.fail('--lr must be > 0')
    assert e.value.code == f'{script}: error: --lr must be > 0'

def test_resume_keeps_the_runs_schedule_and_refuses_changes(tmp_path):
    run = run_train(tmp_path, '--encoder', 'none', '--max-steps', '1', '--ckpt-every', '1', '--log_every=1')
    resumed = irepa.main(['--resume', run, '--max-steps', '3'])             # ckpt-every / log-every: the run's own
    assert sorted(os.listdir(os.path.join(resumed, 'checkpoints'))) == ['0000001.pt', '0000002.pt', '0000003.pt']
    assert len([l for l in open(os.path.join(run, 'log.txt')) if l.startswith('step ')]) == 3
    with pytest.raises(SystemExit, match=r"--lr 0.5 differs from the run's 0.001") as e:
        irepa.main(['--resume', run, '--max-steps', '4', '--lr', '0.5'])
    assert '--data-path' in str(e.value) and '--grad-accum' in str(e.value) and '--resume,' not in str(e.value)
    assert '--log_every,' in str(e.value) and '--log-every' not in str(e.value)      # a recipe key, not a flag
    with pytest.raises(SystemExit, match='--model SiT-T/2 differs'):
        irepa.main(['--resume', run, '--max-steps', '4', '--model', 'SiT-T/2'])
    irepa.main(['--resume', run, '--max-steps', '4', '--lr', '1e-3'])        # the same value is no change
    assert load_last(run)['step'] == 4

def test_resume_skips_a_corrupt_newest_checkpoint_and_removes_leftovers(tmp_path, capsys):
    run = run_train(tmp_path, '--encoder', 'none', '--max-steps', '2', '--ckpt-every', '1')
    newest = os.path.join(run, 'checkpoints', '0000002.pt')
    with open(newest, 'r+b') as f:
        f.truncate(500)                                                    # a copy cut short
    open(os.path.join(run, 'checkpoints', '0000003.pt.tmp'), 'w').write('killed mid-save')
    irepa.main(['--resume', run, '--max-steps', '3'])
    err = capsys.readouterr().err                                          # one line, no source line after it
    assert re.fullmatch(r'\S+: warning: skipping unreadable checkpoint \S+0000002.pt \(\w+\); trying the one before\n', err)
    assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['0000001.pt', '0000002.pt', '0000003.pt']
    assert 'resuming at step 1' in open(os.path.join(run, 'log.txt')).read()
    assert load_last(run)['step'] == 3

def test_resume_may_move_the_data_but_not_change_it(tmp_path, monkeypatch):
    data = make_folder(tmp_path / 'data', n=4)                                # 2 classes x 4 images
    monkeypatch.setenv('IREPA_PRECISION', 'fp32')
    run = run_train(tmp_path / 'r', '--encoder', 'none', '--max-steps', '1', '--data-path', data)
    shutil.copytree(data, tmp_path / 'moved')
    shutil.copytree(data, tmp_path / 'more')
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / 'more' / 'a_cat' / 'extra.png')
    shutil.copytree(data, tmp_path / 'other')
    os.rename(tmp_path / 'other' / 'b_dog', tmp_path / 'other' / 'c_cow')
    for folder, msg in (('more', 'has 9 images, the run had 8'), ('other', 'the classes in')):
        with pytest.raises(SystemExit, match=msg):
            irepa.main(['--resume', run, '--max-steps', '2', '--data-path', str(tmp_path / folder)])
    monkeypatch.setenv('IREPA_PRECISION', 'bf16')
    irepa.main(['--resume', run, '--max-steps', '2', '--data-path', str(tmp_path / 'moved')])
    assert load_last(run)['step'] == 2
    assert 'the run trained in fp32 until now and goes on in bf16' in open(os.path.join(run, 'log.txt')).read()

def test_leftover_removal_tolerates_another_rank_removing_it_first(tmp_path, monkeypatch):
    run = run_train(tmp_path, '--encoder', 'none', '--max-steps', '1')
    gone = os.path.join(run, 'checkpoints', '0000002.pt.tmp')             # listed, then removed by another rank
    real_glob = glob.glob
    monkeypatch.setattr(glob, 'glob', lambda p: [gone] if p.endswith('*.tmp') else real_glob(p))
    assert runs.load_latest_checkpoint(run)['step'] == 1

def test_resume_of_a_checkpoint_from_an_older_irepa_is_a_one_line_error(tmp_path):
    """No older checkpoint format is read (none was released); resuming one says so instead of a traceback."""
    run = run_train(tmp_path, '--encoder', 'none', '--max-steps', '1')
    path = runs.latest_checkpoint(run)
    ck = torch.load(path, weights_only=False)
    del ck['args']['objective'], ck['args']['spatial_norm']
    torch.save(ck, path)
    with pytest.raises(SystemExit, match=r"has no objective, spatial_norm: an older irepa.py wrote it") as e:
        irepa.main(['--resume', run, '--max-steps', '2'])
    assert '\n' not in str(e.value)

def test_checkpoint_written_in_the_background_holds_its_own_steps_weights(tmp_path, monkeypatch):
    """The save runs in a thread while training goes on: a slow write (here 0.5 s) must still hold the weights of
    the step it names, not later ones; the run waits for the last save before it returns."""
    import time as _time
    slow = runs.save_checkpoint
    def save(path, ckpt):
        _time.sleep(0.5)
        slow(path, ckpt)
    monkeypatch.setattr(runs, 'save_checkpoint', save)
    run = run_train(tmp_path / 'a', '--encoder', 'hog', '--irepa', '--max-steps', '4', '--ckpt-every', '2')
    assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['0000002.pt', '0000004.pt']
    mid = torch.load(os.path.join(run, 'checkpoints', '0000002.pt'), weights_only=False)
    two = load_last(run_train(tmp_path / 'b', '--encoder', 'hog', '--irepa', '--max-steps', '2'))
    for part in ('model', 'ema'):
        for k in two[part]:
            assert torch.equal(mid[part][k], two[part][k]), (part, k)
    assert mid['opt']['state'][0]['step'] == two['opt']['state'][0]['step'] == 2

def test_a_failed_background_save_is_logged_at_once_and_the_next_one_tries_again(tmp_path, monkeypatch):
    real, calls = runs.save_checkpoint, []
    def flaky(path, ckpt):
        calls.append(path)
        if len(calls) == 1 or path.endswith('0000006.pt'):
            raise OSError(28, 'No space left on device')
        real(path, ckpt)
    monkeypatch.setattr(runs, 'save_checkpoint', flaky)
    run = run_train(tmp_path, '--encoder', 'none', '--max-steps', '4', '--ckpt-every', '2')
    log = open(os.path.join(run, 'log.txt')).read()
    assert 'warning: could not save' in log and '0000002.pt (OSError' in log and 'next checkpoint tries again' in log
    assert os.listdir(os.path.join(run, 'checkpoints')) == ['0000004.pt']
    with pytest.raises(SystemExit, match=r'could not save .*0000006.pt \(OSError'):       # the run's last: stops
        irepa.main(['--resume', run, '--max-steps', '6'])
    log = open(os.path.join(run, 'log.txt')).read()
    assert 'could not save' not in log.split('0000004.pt')[-1]           # no 'training goes on' before the end


# -----------------------------------------------------------------------------
# Nothing lost on a cluster: a scheduler's signal, durable writes (real signals to real processes, real write errors)

def start(argv, out, ranks=0, preexec_fn=None):
    """irepa.py (under torchrun with `ranks` CPU ranks if any) in its own process group (as a scheduler sees a job),
    stdout and stderr to the file `out`."""
    env = dict(os.environ, IREPA_PRECISION='fp32', OMP_NUM_THREADS='1')
    python = torchrun_command(ranks) if ranks else [sys.executable]
    return subprocess.Popen([*python, os.path.join(HERE, 'irepa.py'), *argv], cwd=HERE, env=env, stdout=open(out, 'w'),
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec_fn)

def wait_for(out, text, proc, timeout=240):
    t0 = time.time()
    while text not in open(out).read():
        assert proc.poll() is None and time.time() - t0 < timeout, open(out).read()[-3000:]
        time.sleep(0.1)

def children(pid):
    """The processes pid started (Linux /proc)."""
    kids = []
    for stat in glob.glob('/proc/[0-9]*/stat'):
        with contextlib.suppress(OSError):
            fields = open(stat).read().rsplit(')', 1)[1].split()
            if int(fields[1]) == pid:
                kids.append(int(stat.split('/')[2]))
    return sorted(kids)

STOPPED = r"stopped on (SIG\w+) after step (\d+), saved in (\S+); go on with --resume (\S+)"

def test_sigterm_to_every_process_saves_the_step_and_a_resume_is_exact(tmp_path):
    """SLURM signals every process of a job step, the loader's workers too: the run finishes its step, saves it, says so
    in one line and exits 0; --resume then trains as if nothing had happened."""
    out = str(tmp_path / 'out.txt')
    argv = TRAIN + ['--encoder', 'hog', '--irepa', '--max-steps', '500', '--num-workers', '2']
    p = start(argv + ['--results-dir', str(tmp_path / 'a')], out)
    wait_for(out, 'step 3/500', p)
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(timeout=60) == 0
    text = open(out).read()
    (sig, step, ckpt, run), = re.findall(STOPPED, text)
    k = int(step)
    assert sig == 'SIGTERM' and k >= 3 and 'Traceback' not in text
    assert ckpt == runs.latest_checkpoint(run) and torch.load(ckpt, weights_only=False)['step'] == k
    for more in (['--resume', run, '--max-steps', str(k + 2)],                 # in processes like the first
                 argv + ['--results-dir', str(tmp_path / 'b'), '--max-steps', str(k + 2)]):
        assert start(more, str(tmp_path / 'more.txt')).wait(timeout=120) == 0
    resumed, straight = load_last(run), load_last(glob.glob(str(tmp_path / 'b' / '*'))[0])
    assert resumed['step'] == straight['step'] == k + 2
    for part in ('model', 'ema'):
        for name in straight[part]:
            assert torch.equal(resumed[part][name], straight[part][name]), (part, name)

@pytest.mark.parametrize('to', ['one worker', 'torchrun'])
def test_a_signal_stops_both_ranks_after_the_same_step(tmp_path, to):
    """A signal that reaches one rank (SIGUSR1 to one worker) or torchrun (SIGTERM, which it forwards): both ranks
    stop after the same step, rank 0 saves it, no collective breaks. torchrun exits 1 after a signal it forwarded
    even though its workers exit 0 (torch.distributed.run's behaviour, which docs/cluster.md says)."""
    out = str(tmp_path / 'out.txt')
    p = start(TRAIN + ['--encoder', 'none', '--max-steps', '500', '--results-dir', str(tmp_path)], out, ranks=2)
    wait_for(out, 'step 3/500', p)
    if to == 'one worker':
        os.kill(children(p.pid)[-1], signal.SIGUSR1)
    else:
        os.kill(p.pid, signal.SIGTERM)
    assert p.wait(timeout=120) == (0 if to == 'one worker' else 1)
    text = open(out).read()
    stops = re.findall(STOPPED, text)
    assert len(stops) == 2 and len(set(stops)) == 1, text[-3000:]               # both ranks: the same step
    assert sum(line.startswith('rank 1: stopped on') for line in text.splitlines()) == 1
    sig, step, ckpt, run = stops[0]
    assert sig == ('SIGUSR1' if to == 'one worker' else 'SIGTERM')
    assert torch.load(ckpt, weights_only=False)['step'] == int(step) and ckpt == runs.latest_checkpoint(run)
    assert 'rror' not in text.replace('SignalException', '').split('saved in')[0]  # no broken collective before it

def test_writes_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    """fsync the file, rename it, fsync its folder: after a power loss the newest file is whole or the old one."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: events.append(('fsync', os.readlink(f'/proc/self/fd/{fd}'))) or
                        real_fsync(fd))
    monkeypatch.setattr(os, 'replace', lambda a, b: events.append(('replace', str(a), str(b))) or real_replace(a, b))
    for path, write in ((tmp_path / 'a.pt', lambda p: runs.save_checkpoint(p, {'w': torch.ones(3)})),
                        (tmp_path / 'b.npy', lambda p: data.save_npy(p, np.ones(3))),
                        (tmp_path / 'c.json', lambda p: data.write_json(p, {'complete': True}))):
        events.clear()
        write(str(path))
        assert events == [('fsync', f'{path}.tmp'), ('replace', f'{path}.tmp', str(path)), ('fsync', str(tmp_path))]
    assert torch.load(tmp_path / 'a.pt')['w'].sum() == 3 and json.load(open(tmp_path / 'c.json'))['complete']

def test_a_failed_write_removes_its_temporary_file_at_once(tmp_path):
    """A write that fails part-way (here the file-size limit, EFBIG, as a full disk fails with ENOSPC) leaves neither a
    partial file under the real name nor the temporary file holding the space; the old checkpoint is untouched."""
    path = str(tmp_path / '0000002.pt')
    torch.save({'step': 1}, path)
    script = f"""
import resource, signal, sys, torch
sys.path.insert(0, {HERE!r})
import runs
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                     # a write error instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    runs.save_checkpoint({path!r}, dict(w=torch.zeros(1 << 20), step=2))
except Exception as e:                                            # torch.save's RuntimeError after the OSError
    print('failed', (e.__context__ or e).errno)
"""
    r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ['failed', str(errno.EFBIG)], r.stderr
    assert os.listdir(tmp_path) == ['0000002.pt'] and torch.load(path)['step'] == 1

def test_a_resume_lets_go_of_the_loaded_checkpoint(tmp_path, monkeypatch):
    """The checkpoint read for a resume is memory-mapped: once restored, no reference to its weights is left."""
    run = run_train(tmp_path, '--encoder', 'none', '--max-steps', '1')
    refs, load, log_start = [], runs.load_latest_checkpoint, runs.log_start
    def loaded(run_dir):
        ckpt = load(run_dir)
        refs.append(weakref.ref(next(iter(ckpt['ema'].values()))))
        return ckpt
    def started(*a):
        gc.collect()
        assert refs[0]() is None, 'the loaded checkpoint is still referenced'
        log_start(*a)
    monkeypatch.setattr(runs, 'load_latest_checkpoint', loaded)
    monkeypatch.setattr(runs, 'log_start', started)
    irepa.main(['--resume', run, '--max-steps', '2'])
    assert refs and load_last(run)['step'] == 2

def test_a_run_that_fails_leaves_no_handler_or_save_behind(tmp_path):
    """However a run ends (here a NaN loss, fail()), the process gets its signals back and keeps no failed save."""
    runs.SAVING['error'] = 'a failure of an earlier run'
    with pytest.raises(SystemExit, match='loss (nan|inf), gradient norm'):
        run_train(tmp_path, '--encoder', 'none', '--max-steps', '3', '--lr', '1e30', '--clip_grad=None')
    assert all(signal.getsignal(s) is signal.default_int_handler if s == signal.SIGINT else
               signal.getsignal(s) == signal.SIG_DFL for s in runs.Preemption.SIGNALS)
    assert runs.SAVING == dict(thread=None, error=None)

def test_the_log_goes_on_when_log_txt_cannot_be_written(tmp_path, capsys):
    log = runs.Logger(str(tmp_path), True)
    os.makedirs(tmp_path / 'log.txt')                                         # appending to it fails (an OSError)
    log('step 1')
    log('step 2')
    out, err = capsys.readouterr()
    assert out == 'step 1\nstep 2\n' and err.count('warning: cannot append to') == 1

def test_ranks_do_not_claim_a_checkpoint_rank_0_could_not_write(tmp_path):
    """A stop whose checkpoint rank 0 cannot write (RLIMIT_FSIZE: 'File too large', as a full disk says 'No space
    left'): every rank ends with one error line (rank 0's names the cause), none says 'saved in'."""
    out = str(tmp_path / 'out.txt')
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                          # a write error, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    p = start(TRAIN + ['--encoder', 'none', '--max-steps', '500', '--results-dir', str(tmp_path)], out, ranks=2,
              preexec_fn=limit)
    wait_for(out, 'step 3/500', p)
    os.kill(children(p.pid)[-1], signal.SIGTERM)
    assert p.wait(timeout=120) != 0
    text = open(out).read()
    errors = [line for line in text.splitlines() if line.startswith('irepa.py: error: ')]
    assert len(errors) == 2 and 'File too large' in errors[0] + errors[1], text[-3000:]
    assert sum("rank 0 could not save the run's last checkpoint" in e for e in errors) == 1
    assert 'saved in' not in text and 'terminate called' not in text
    assert not glob.glob(str(tmp_path / '*' / 'checkpoints' / '*'))

FAIL_TOGETHER = '''
import os, sys, time
sys.path.insert(0, {here!r})
import torch.distributed as dist
import runs
dist.init_process_group('gloo')
if dist.get_rank() == 0:
    time.sleep(3)                                 # rank 1 fails first
runs.fail_together('the same error')
'''

def test_fail_together_waits_for_every_rank_to_say_it(tmp_path):
    """Rank 1 fails 3 s before rank 0: torchrun would end rank 0 as soon as rank 1 exits, so rank 1 waits (a barrier)
    until rank 0 has said the line too; no rank aborts holding the process group."""
    script = tmp_path / 'fail.py'
    script.write_text(FAIL_TOGETHER.format(here=HERE))
    r = subprocess.run([*torchrun_command(2), str(script)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    lines = [line for line in r.stderr.splitlines() if line.endswith(': error: the same error')]
    assert r.returncode == 1 and len(lines) == 2 and 'terminate called' not in r.stderr, r.stderr[-3000:]

def test_no_checkpoint_of_non_finite_weights(tmp_path):
    """save_run refuses weights that are not finite (model or EMA) and names the step; nothing is written."""
    model = torch.nn.Linear(2, 2)
    ema, opt = copy.deepcopy(model), torch.optim.AdamW(model.parameters())
    os.makedirs(tmp_path / 'checkpoints')
    args = argparse.Namespace(step=0)
    for bad in (model, ema):
        with torch.no_grad():
            bad.weight[0, 0] = float('nan')
        with pytest.raises(SystemExit, match='non-finite weights at step 7; not saving'):
            runs.save_run(print, str(tmp_path), 7, model, ema, opt, args, master=True)
        with torch.no_grad():
            bad.weight[0, 0] = 0.0
    runs.save_run(print, str(tmp_path), 8, model, ema, opt, args, master=True)
    runs.wait_for_save()
    assert [os.path.basename(p) for p in runs.checkpoints(str(tmp_path))] == ['0000008.pt']

def test_resume_names_what_it_cannot_take(tmp_path):
    """--resume of a checkpoint file names the run folder to give; a --data-path whose classes differ names them;
    one with another image count says so (another epoch order)."""
    data_a = make_folder(tmp_path / 'a', classes=('cat', 'dog'), n=4)
    run = run_train(tmp_path / 'r', '--encoder', 'none', '--max-steps', '1', '--data-path', data_a,
                    '--global-batch-size', '4')
    ckpt = runs.latest_checkpoint(run)
    with pytest.raises(SystemExit, match=f"--resume takes the run's folder, not a checkpoint: --resume {re.escape(run)}"):
        irepa.main(['--resume', ckpt, '--max-steps', '2'])
    data_b = make_folder(tmp_path / 'b', classes=('cat', 'cow'), n=4)
    with pytest.raises(SystemExit, match=re.escape("differ from the run's (not in the run: ['cow'], missing: ['dog'])")):
        irepa.main(['--resume', run, '--max-steps', '2', '--data-path', data_b])
    data_c = make_folder(tmp_path / 'c', classes=('cat', 'dog'), n=5)
    with pytest.raises(SystemExit, match='has 10 images, the run had 8'):
        irepa.main(['--resume', run, '--max-steps', '2', '--data-path', data_c])

def test_two_runs_started_at_once_never_share_a_folder(tmp_path, monkeypatch):
    """Rank 0 makes the run's folder with os.makedirs, which fails on one that exists: a folder another run made
    after any check of ours is never taken (os.path.exists lies here to open that window)."""
    args = irepa.get_args(['--setting', 'demo', '--encoder', 'none', '--results-dir', str(tmp_path)])
    first = runs.new_run_dir(args, master=True, world=1)
    monkeypatch.setattr(os.path, 'exists', lambda p: False)
    second, third = runs.new_run_dir(args, True, 1), runs.new_run_dir(args, True, 1)
    assert (second, third) == (first + '-1', first + '-2') and all(map(os.path.isdir, (first, second, third)))
