"""Fixtures the test files share: a local torch.hub folder, fp32, a random-weight SD-VAE."""
import textwrap

import pytest
import torch

HUBCONF = textwrap.dedent('''
    import torch, torch.nn as nn, torch.nn.functional as F
    dependencies = ['torch']

    class TinyViT(nn.Module):
        def __init__(self, embed_dim, fixed_tokens=None):
            super().__init__()
            self.patch_size, self.embed_dim, self.fixed_tokens = 14, embed_dim, fixed_tokens
            self.patch_embed = nn.Conv2d(3, embed_dim, 14, 14)
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + 5 * 5, embed_dim))   # trained at 70 px, like 518 px
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

        def forward_features(self, x):
            t = self.patch_embed(x).flatten(2).transpose(1, 2)
            if t.shape[1] != self.pos_embed.shape[1] - 1:
                raise RuntimeError('pos_embed was not resampled to the grid')
            t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1) + self.pos_embed
            t = F.layer_norm(t, t.shape[-1:])
            if self.fixed_tokens:
                t = t[:, :1 + self.fixed_tokens]
            return {'x_norm_clstoken': t[:, 0], 'x_norm_patchtokens': t[:, 1:]}

    def dinov2_vits14(pretrained=True, **kw):
        return TinyViT(24)

    def dinov2_vitb14(pretrained=True, **kw):
        return TinyViT(32, fixed_tokens=4)        # a broken encoder whose grid cannot match

    class TinyDINOv3(nn.Module):                  # patch 16, RoPE (no pos_embed), CLS + 4 storage tokens
        def __init__(self):
            super().__init__()
            self.patch_size, self.embed_dim = 16, 20
            self.patch_embed = nn.Conv2d(3, 20, 16, 16)

        def forward_features(self, x):
            t = self.patch_embed(x).flatten(2).transpose(1, 2)
            t = F.layer_norm(torch.cat([torch.full_like(t[:, :1], 7.0).expand(-1, 5, -1), t], 1), t.shape[-1:])
            return {'x_norm_clstoken': t[:, 0], 'x_storage_tokens': t[:, 1:5], 'x_norm_patchtokens': t[:, 5:]}

    def dinov3_vits16(pretrained=True, weights=None, **kw):
        model = TinyDINOv3()
        model.load_state_dict(torch.load(weights))      # the gated file, given by path
        return model

    class TinyDINO(nn.Module):                    # DINOv1: patch 16, absolute pos_embed for 4x4, no forward_features
        def __init__(self):
            super().__init__()
            self.embed_dim = 12                   # like dino's VisionTransformer: patch_size only on patch_embed
            self.patch_embed = nn.Conv2d(3, 12, 16, 16)
            self.patch_embed.patch_size = 16
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + 4 * 4, 12))

        def get_intermediate_layers(self, x, n=1):
            t = self.patch_embed(x).flatten(2).transpose(1, 2)
            if t.shape[1] != self.pos_embed.shape[1] - 1:
                raise RuntimeError('pos_embed was not resampled to the grid')
            t = torch.cat([torch.full_like(t[:, :1], 7.0), t], 1) + self.pos_embed
            return [F.layer_norm(t, t.shape[-1:])]

    def dino_vits16(pretrained=True, **kw):
        return TinyDINO()

    def not_an_encoder(pretrained=True, **kw):    # a hub entry without DINOv2's interface
        return nn.Sequential(nn.Conv2d(3, 8, 4, 4))

    def offline_entry(pretrained=True, **kw):     # a hub entry whose weights cannot be downloaded
        raise OSError('<urlopen error [Errno -3] Temporary failure in name resolution>')

    def wrong_output(pretrained=True, **kw):      # the attributes, but forward_features returns a list
        model = TinyViT(24)
        model.forward_features = lambda x: [x]
        return model
''')

@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    """In-process tests are one process even inside a torchrun or SLURM job that exports these (the
    tests' own torchrun launches set their own)."""
    for name in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)

@pytest.fixture
def hub_dir(tmp_path):
    d = tmp_path / 'hub'
    d.mkdir()
    (d / 'hubconf.py').write_text(HUBCONF)
    return str(d)

@pytest.fixture
def fp32(monkeypatch):
    """Runs compared to float tolerance pin fp32: bf16 autocast rounds a batch of 8 and two of 4 differently."""
    monkeypatch.setenv('IREPA_PRECISION', 'fp32')

@pytest.fixture(scope='session')
def vae_home(tmp_path_factory):
    import vae
    home = tmp_path_factory.mktemp('torch_home')
    folder = home / 'hub' / 'checkpoints'
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(vae.AutoencoderKL().state_dict(), folder / vae.VAE_FILE)
    torch.save({'latents_scale': torch.tensor([0.5, 1.0, 2.0, 4.0]).view(1, 4, 1, 1),          # the official shape
                'latents_bias': torch.tensor([0.1, 0.0, -0.1, 0.2]).view(1, 4, 1, 1)},
               folder / vae.STATS_FILE)
    return str(home)
