"""
hog.py -- a weight-free alignment target for REPA and iREPA, the demo's (offline). Called like
irepa.py's hub encoders: images (B, 3, H, W) in 0..255 -> tokens (B, T, 36).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

class HOG(nn.Module):
    """Weight-free Histogram of Oriented Gradients target (Dalal & Triggs 2005), one cell per SiT
    token. The paper (section 3) shows such classical descriptors work as REPA targets: they are
    pure spatial structure. Per cell: 9 unsigned-orientation bins, magnitude-weighted with linear
    bin interpolation; the token of a cell is its histogram as normalised in each of the 4
    overlapping 2x2-cell blocks that contain it (L2-Hys on each 36-d block vector), giving
    4 * 9 = 36 dims per token."""
    def __init__(self, grid_size, cell=8, bins=9):
        super().__init__()
        self.grid_size = grid_size
        self.cell = cell
        self.bins = bins
        self.embed_dim = 4 * bins
        self.name = 'hog'

    # img: (B, 3, H, W) in 0..255.
    def forward(self, img):
        G, c, nb = self.grid_size, self.cell, self.bins
        x = F.interpolate(img.float() / 255, size=(G * c, G * c), mode='bilinear', antialias=True,
                          align_corners=False)
        xp = F.pad(x, (1, 1, 1, 1), mode='replicate')
        gx = xp[:, :, 1:-1, 2:] - xp[:, :, 1:-1, :-2]                          # [-1, 0, 1] filters
        gy = xp[:, :, 2:, 1:-1] - xp[:, :, :-2, 1:-1]
        mag = torch.sqrt(gx ** 2 + gy ** 2)                                     # (B, 3, S, S)
        # The strongest colour channel per pixel.
        best = mag.argmax(dim=1, keepdim=True)
        mag, gx, gy = (a.gather(1, best) for a in (mag, gx, gy))                # (B, 1, S, S)
        # The unsigned orientation in [0, pi).
        ang = torch.atan2(gy, gx) % math.pi
        # Bin centres at (i + 0.5) * pi / nb.
        pos = ang / math.pi * nb - 0.5
        lo = torch.floor(pos)
        w_hi = pos - lo
        bins = torch.arange(nb, device=x.device).view(1, nb, 1, 1)
        hist = (mag * (1 - w_hi) * (bins == lo.long() % nb)
                + mag * w_hi * (bins == (lo.long() + 1) % nb))
        # The histograms summed per cell, (B, nb, G, G).
        return self.block_features(F.avg_pool2d(hist, c) * c * c)

    def block_features(self, hist):
        """(B, nb, G, G) cell histograms -> (B, G*G, 4 * nb) tokens."""
        G = self.grid_size
        # Dalal-Triggs blocks of 2x2 cells (stride 1, edges replicated): each 36-d block vector is
        # L2-normalised, clipped at 0.2 and renormalised as a whole (L2-Hys), so a cell keeps its
        # block's local contrast.
        hp = F.pad(hist, (1, 1, 1, 1), mode='replicate')                        # (B, nb, G+2, G+2)
        blocks = torch.stack([hp[:, :, dy:dy + G + 1, dx:dx + G + 1]
                              for dy in (0, 1) for dx in (0, 1)], 2)          # (B, nb, 4, G+1, G+1)
        blocks = blocks / torch.sqrt(blocks.pow(2).sum((1, 2), keepdim=True) + 1e-6)
        blocks = blocks.clamp(max=0.2)
        blocks = blocks / torch.sqrt(blocks.pow(2).sum((1, 2), keepdim=True) + 1e-6)
        # The 4 blocks containing each cell; k is where the cell sits in that block.
        feats = []
        for by in (0, 1):
            for bx in (0, 1):
                k = (1 - by) * 2 + (1 - bx)
                feats.append(blocks[:, :, k, by:by + G, bx:bx + G])              # (B, nb, G, G)
        return torch.cat(feats, dim=1).flatten(2).transpose(1, 2)              # (B, G*G, 36)
