"""
hubconf.py -- CIFAR-10 ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", arXiv 1512.03385,
section 4.2) for torch.hub, with the trained weights of github akamaster/pytorch_resnet_cifar10 (BSD-2).

    torch.hub.load('experiments', 'resnet56', source='local')          # classifier; Frechet distance features
    torch.hub.load('experiments', 'resnet20_stage3', source='local')   # alignment target: (B, 64, 64) tokens at 32 px
    python irepa.py ... --hub-dir experiments                          # irepa.py loads hub entries like DINOv2

The two encoder entries look like DINOv2 to irepa.py's wrapper: `embed_dim`, `patch_size` (input pixels per token
side), no `pos_embed`, and `forward_features(x)['x_norm_patchtokens']` = (B, T, C) in raster order. Their input is
already normalised with the ImageNet mean/std, exactly the normalisation akamaster's trainer.py trained with.
The tokens are raw ReLU features (no LayerNorm, unlike DINOv2's "norm" tokens); REPA's cosine loss and iREPA's
spatial normalisation do not need one.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

dependencies = ['torch']

# weights: akamaster/pytorch_resnet_cifar10 pretrained_models/ (the 8 hex digits are the sha256 prefix)
URL = 'https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/'
LOCAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data')

# -----------------------------------------------------------------------------
# The CIFAR ResNet (paper section 4.2): a 3x3 conv to 16 channels, three stages of n basic blocks at
# 16/32/64 channels on 32/16/8 px maps, global average pool, linear. 6n + 2 layers: n = 3 -> ResNet-20,
# n = 9 -> ResNet-56. Names follow akamaster's resnet.py, so its state dicts load by name.

class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU. Where the block halves the map and doubles the
    channels, the shortcut is the paper's option A (parameter-free): take every second pixel and zero-pad the
    channels, planes // 4 on each side (akamaster's LambdaLayer), so the input lands in the middle channels."""
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - in_planes) // 2 if stride != 1 or in_planes != planes else None

    def shortcut(self, x):
        if self.pad is None:
            return x                                                            # identity
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))       # (B, C, H, W) -> (B, 2C, H/2, W/2)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

class ResNet(nn.Module):
    """CIFAR ResNet with blocks [n, n, n]. forward(x) -> logits; pool(x) -> the 64-d average-pooled features;
    forward_features(x) -> {'x_norm_patchtokens': the output of stage `token_stage` as (B, T, C) tokens}.
    x: (B, 3, 32, 32), normalised with the ImageNet mean/std."""
    def __init__(self, n, num_classes=10, token_stage=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(*[BasicBlock(16, 16) for _ in range(n)])
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), *[BasicBlock(32, 32) for _ in range(n - 1)])
        self.layer3 = nn.Sequential(BasicBlock(32, 64, 2), *[BasicBlock(64, 64) for _ in range(n - 1)])
        self.linear = nn.Linear(64, num_classes)
        self.token_stage = token_stage
        self.embed_dim = 16 * 2 ** (token_stage - 1)                            # 16 / 32 / 64 channels
        self.patch_size = 2 ** (token_stage - 1)                                # 1 / 2 / 4 px per token side

    def stages(self, x, last=3):
        """The outputs of stages 1..last (each after its last block's ReLU)."""
        out = F.relu(self.bn1(self.conv1(x)))                                   # (B, 16, 32, 32)
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3)[:last]:
            out = layer(out)                                                    # (B, 16/32/64, 32/16/8, 32/16/8)
            maps.append(out)
        return maps

    def forward_features(self, x):
        f = self.stages(x, self.token_stage)[-1]                                # (B, C, h, w)
        return {'x_norm_patchtokens': f.flatten(2).transpose(1, 2)}             # (B, h*w, C), raster order

    def pool(self, x):
        return self.stages(x)[-1].mean(dim=(2, 3))                              # (B, 64)

    def forward(self, x):
        return self.linear(self.pool(x))                                        # (B, num_classes)

def load_weights(model, weights, file_name):
    """weights: a path to an akamaster checkpoint ({'state_dict': {'module.' + name: tensor}}, saved from
    DataParallel), or None: $CIFAR_RESNET_DIR/<file_name>, or ../shared/data/<file_name> next to the repo, when
    present, else the upstream
    URL (sha256-checked, cached in $TORCH_HOME/hub/checkpoints/)."""
    local = os.path.join(os.environ.get('CIFAR_RESNET_DIR', LOCAL), file_name)     # the env var: another folder
    if weights is None and not os.path.isfile(local):
        ckpt = torch.hub.load_state_dict_from_url(URL + file_name, map_location='cpu', check_hash=True)
    else:
        ckpt = torch.load(weights or local, map_location='cpu')
    state = {k.removeprefix('module.'): v for k, v in ckpt.get('state_dict', ckpt).items()}
    model.load_state_dict(state, strict=True)                                  # fills the missing num_batches_tracked
    return model.eval()

# -----------------------------------------------------------------------------
# Variants for the title question (iREPA sections 2-3): targets whose global information and spatial structure
# vary independently. Each is an 8x8 grid of tokens at 32 px, SiT-T/4's grid, with DINOv2's interface.

class Tokens(nn.Module):
    """tokens(x) -> (B, T, C) on an 8x8 grid, wrapped in DINOv2's interface (embed_dim, patch_size = 4 px per
    token side, forward_features(x)['x_norm_patchtokens'])."""
    def __init__(self, tokens, embed_dim, net=None):
        super().__init__()
        self.tokens, self.embed_dim, self.patch_size, self.net = tokens, embed_dim, 4, net

    def forward_features(self, x):
        return {'x_norm_patchtokens': self.tokens(x)}

def stage_tokens(net, stage):
    """Stage `stage`'s map average-pooled to 8x8 (stage 1: 4x4 pooling, 2: 2x2, 3: none), as (B, 64, C) tokens."""
    def tokens(x):
        f = net.stages(x, stage)[-1]                                            # (B, C, 32/16/8, 32/16/8)
        return F.adaptive_avg_pool2d(f, 8).flatten(2).transpose(1, 2)           # (B, 64, C), raster order
    return tokens

def global_mix(tokens, alpha):
    """iREPA Figure 3c with the average-pooled feature g that ResNet-20's classifier reads in place of DINOv2's CLS
    token: p_i + alpha * g. More global information in every token, less contrast between tokens."""
    def mixed(x):
        p = tokens(x)                                                           # (B, T, C)
        return p + alpha * p.mean(dim=1, keepdim=True)
    return mixed

def shuffled(tokens):
    """The tokens permuted at random within each image: the same set (so the same average-pooled feature, the same
    global information) with no spatial layout. The permutation is drawn from the image's own pixels, so an image
    gets the same one at every call, with no generator state to save for an exact resume."""
    def shuffle(x):
        p = tokens(x)                                                           # (B, T, C)
        key = torch.sin(F.avg_pool2d(x.float(), 4).sum(1).flatten(1) * 12.9898 +
                        torch.arange(p.shape[1], device=x.device) * 78.233) * 43758.5453
        order = (key - key.floor()).argsort(dim=1)                              # (B, T) a pseudo-random permutation
        return p.gather(1, order[:, :, None].expand_as(p))
    return shuffle

def pixel_tokens(x):
    """Raw 4x4 pixel patches (ImageNet-normalised RGB), (B, 64, 48): all local, no learned features."""
    return F.unfold(x.float(), kernel_size=4, stride=4).transpose(1, 2)        # (B, 64, 3 * 4 * 4)

def random_resnet20(seed=0):
    """ResNet-20 with PyTorch's default initialisation from a fixed seed (the global generator is left untouched);
    eval-mode BatchNorm with its initial statistics is the identity."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet(3).eval()

# -----------------------------------------------------------------------------
# torch.hub entry points

def resnet20_stage3(weights=None):
    """Pretrained ResNet-20 (0.27M params) as an encoder: stage-3 tokens, (B, 64, 64) at 32 px (an 8x8 grid)."""
    return load_weights(ResNet(3, token_stage=3), weights, 'resnet20-12fca82f.th')

def resnet20_stage2(weights=None):
    """Pretrained ResNet-20 as an encoder: stage-2 tokens, (B, 256, 32) at 32 px (a 16x16 grid)."""
    return load_weights(ResNet(3, token_stage=2), weights, 'resnet20-12fca82f.th')

def resnet56(weights=None):
    """Pretrained ResNet-56 classifier (0.85M params); `pool` gives the 64-d Frechet distance features."""
    return load_weights(ResNet(9), weights, 'resnet56-4bfd9763.th')

def resnet20_stage3_global(alpha, weights=None):
    """Pretrained ResNet-20's stage-3 tokens plus alpha times their mean: (B, 64, 64)."""
    net = resnet20_stage3(weights)
    return Tokens(global_mix(stage_tokens(net, 3), alpha), 64, net)

def resnet20_stage3_global025(weights=None):
    return resnet20_stage3_global(0.25, weights)

def resnet20_stage3_global05(weights=None):
    return resnet20_stage3_global(0.5, weights)

def resnet20_stage3_global1(weights=None):
    return resnet20_stage3_global(1.0, weights)

def resnet20_stage3_shuffled(weights=None):
    """Pretrained ResNet-20's stage-3 tokens, permuted within each image: (B, 64, 64)."""
    net = resnet20_stage3(weights)
    return Tokens(shuffled(stage_tokens(net, 3)), 64, net)

def resnet20_stage2_pooled(weights=None):
    """Pretrained ResNet-20's stage-2 map (32 channels at 16x16) average-pooled to 8x8: (B, 64, 32)."""
    net = resnet20_stage3(weights)
    return Tokens(stage_tokens(net, 2), 32, net)

def resnet20_random_stage3():
    """A randomly initialised ResNet-20's stage-3 tokens (seed 0): (B, 64, 64), convolutional structure, no
    training."""
    net = random_resnet20(0)
    return Tokens(stage_tokens(net, 3), 64, net)

def pixels():
    """Raw 4x4 pixel patches: (B, 64, 48)."""
    return Tokens(pixel_tokens, 48)
