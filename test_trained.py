"""trained.py: a trained SiT read back from this repo's checkpoints and the official code's."""
import os

import numpy as np
import pytest
import torch

import irepa
import trained
from test_irepa import run_train, tiny

@pytest.mark.parametrize('projector', ['conv', 'mlp', 'linear'])
def test_official_checkpoint_format_loads_and_samples(tmp_path, vae_home, monkeypatch, projector):
    """ldm/train.py saves {'model', 'ema', 'opt', 'args': argparse.Namespace, 'steps'} with the projector wrapped as
    projectors.0.projection_layer.*; a 'linear' projector is a per-token linear map (here a 1x1 conv)."""
    import argparse
    import sample
    monkeypatch.setenv('TORCH_HOME', vae_home)
    torch.manual_seed(0)
    ours = irepa.SiT_models['SiT-T/2'](input_size=4, in_channels=4, num_classes=10, encoder_depth=2, target_dim=8,
                                       projector='mlp' if projector == 'mlp' else 'conv',
                                       proj_kernel=1 if projector == 'linear' else 3)
    for p in ours.parameters():
        p.data.normal_(0, 0.02)                                            # not the zero init: outputs must match
    sd = {k.replace('projectors.0.', 'projectors.0.projection_layer.'): v for k, v in ours.state_dict().items()}
    if projector == 'linear':
        sd['projectors.0.projection_layer.weight'] = sd['projectors.0.projection_layer.weight'].flatten(1)
    ns = argparse.Namespace(model='SiT-T/2', resolution=32, encoder_depth=2, enc_type='dinov2-vit-b',
                            projection_layer_type=projector, proj_kwargs_kernel_size=1, qk_norm=False,
                            spnorm_method='zscore' if projector == 'conv' else 'none')
    torch.save({'model': sd, 'ema': sd, 'opt': {}, 'args': ns, 'steps': 7}, tmp_path / '0000007.pt')
    del ns.spnorm_method                                                   # sihyun-yu/REPA's train.py: 0.18215 latents
    torch.save({'model': sd, 'ema': sd, 'opt': {}, 'args': ns, 'steps': 7}, tmp_path / 'repa.pt')
    with pytest.raises(ValueError, match="not from End2End-Diffusion/iREPA's ldm/train.py"):
        trained.load_sit(str(tmp_path / 'repa.pt'))
    model, args = trained.load_sit(str(tmp_path / '0000007.pt'))
    assert (args['model'], args['input_size'], args['in_channels'], args['num_classes'], args['vae']) == (
        'SiT-T/2', 4, 4, 10, 'sd-vae-ft-mse')
    assert args['encoder'] == 'dinov2_vitb14'                              # the official name, translated
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 10])
    out, h_proj = model(x, t, y)
    ref_out, ref_zs = ours.eval()(x, t, y)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h_proj, ref_zs)
    if projector == 'conv':
        out = sample.main(['--ckpt', str(tmp_path / '0000007.pt'), '--num-steps', '2', '--num-samples', '2',
                           '--out', str(tmp_path / 's')])
        assert np.load(os.path.join(out, 'samples.npz'))['arr_0'].shape == (2, 32, 32, 3)
        # what this code cannot sample faithfully is refused, with the reason on one line
        ns.spnorm_method = 'zscore'
        for change, msg in ((dict(path_type='cosine'), 'path_type is cosine'), (dict(qk_norm=True), 'qk-norm'),
                            (dict(enc_type='dinov2-vit-b,mocov3-vit-b'), 'several encoders')):
            bad = argparse.Namespace(**{**vars(ns), **change})
            torch.save({'model': sd, 'ema': sd, 'opt': {}, 'args': bad, 'steps': 7}, tmp_path / 'bad.pt')
            with pytest.raises(ValueError, match=msg) as e:
                trained.load_sit(str(tmp_path / 'bad.pt'))
            assert '\n' not in str(e.value)

def test_load_sit_leaves_the_optimizer_state_on_disk(tmp_path, monkeypatch):
    """A checkpoint is memory-mapped: AdamW's moments (2x the model) are never read to sample."""
    run = run_train(tmp_path, '--encoder', 'none', '--max-steps', '1')
    calls, load = [], torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **kw: calls.append(kw) or load(*a, **kw))
    trained.load_sit(run)
    assert calls and all(kw.get('mmap') for kw in calls)

def test_load_sit_refuses_another_model_for_its_own_checkpoint(tmp_path):
    """--model is for official checkpoints: on irepa.py's own it may only repeat what the checkpoint records."""
    run = run_train(tmp_path, '--encoder', 'none', '--max-steps', '1')
    assert trained.load_sit(run, model='SiT-T/4')[1]['model'] == 'SiT-T/4'
    with pytest.raises(ValueError, match=r"--model SiT-XL/2: .*0000001.pt is irepa.py's SiT-T/4 \(--model is for"):
        trained.load_sit(run, model='SiT-XL/2')

class NotATensor:
    pass

def test_load_sit_refuses_truncated_and_foreign_files(tmp_path):
    good = tmp_path / 'good.pt'
    torch.save(dict(ema=tiny().state_dict(), args=dict(model='SiT-T/4', image_size=16, num_classes=5, encoder_depth=2)),
               good)
    (tmp_path / 'cut.pt').write_bytes(good.read_bytes()[:1000])
    torch.save({'ema': {}, 'args': NotATensor()}, tmp_path / 'pickle.pt')
    torch.save({'state_dict': {}}, tmp_path / 'other.pt')
    for name, msg in [('missing.pt', 'no checkpoint at'), ('cut.pt', 'truncated or not a torch checkpoint'),
                      ('pickle.pt', 'truncated or not a torch checkpoint'), ('other.pt', 'not an irepa.py or official')]:
        with pytest.raises(ValueError, match=msg) as e:
            trained.load_sit(str(tmp_path / name))
        assert '\n' not in str(e.value)
