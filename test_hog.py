"""hog.py: the weight-free HOG target."""
import numpy as np
import torch

import hog
import irepa

def test_hog_grid_and_orientation_response():
    enc = irepa.load_encoder('hog', grid_size=4)
    assert enc.embed_dim == 36 and not any(p.requires_grad for p in enc.parameters())
    xs = torch.arange(32).float()
    vertical_edges = ((xs // 4) % 2 * 255).view(1, 1, 1, 32).expand(1, 3, 32, 32)   # stripes along x
    horizontal_edges = vertical_edges.transpose(-1, -2)
    zv, zh = enc(vertical_edges), enc(horizontal_edges)
    assert zv.shape == (1, 16, 36)
    hist_v, hist_h = zv[0].view(16, 4, 9).mean((0, 1)), zh[0].view(16, 4, 9).mean((0, 1))
    # gradient along x (angle 0) -> bins 0 / 8 around 0 and pi; gradient along y (pi/2) -> bin 4
    assert hist_v.argmax().item() in (0, 8) and hist_h.argmax().item() == 4
    assert enc(torch.full((1, 3, 32, 32), 128.0)).abs().max() < 1e-3        # flat image: no gradients
    z = enc(torch.rand(2, 3, 40, 40) * 255)                                # any input size, grid fixed by grid_size
    assert z.shape == (2, 16, 36) and torch.isfinite(z).all()

def test_hog_block_normalisation_is_l2_hys_on_the_36d_block():
    """Reference: Dalal & Triggs (2005) L2-Hys, written as loops. Each 2x2-cell block (stride 1, edge cells
    replicated) is one 36-d vector: L2-normalise, clip at 0.2, L2-normalise again. A cell's token holds its
    9 bins from each of the 4 blocks containing it, ordered (block above-left, above-right, below-left, below-right)."""
    G, eps = 3, 1e-6
    hist = torch.rand(1, 9, G, G, dtype=torch.float64) ** 4 * 10                 # peaky, so clipping matters
    hist[0, :, 0, 0] *= 50                                                     # one high-contrast cell
    hp = np.pad(hist[0].numpy(), ((0, 0), (1, 1), (1, 1)), mode='edge')         # (9, G+2, G+2)
    ref = np.zeros((G, G, 36))
    for i in range(G):
        for j in range(G):
            pieces = []
            for a, b in [(i, j), (i, j + 1), (i + 1, j), (i + 1, j + 1)]:     # padded top-left of each block
                block = hp[:, a:a + 2, b:b + 2]                                 # (9, 2, 2)
                block = block / np.sqrt((block ** 2).sum() + eps)
                block = np.minimum(block, 0.2)
                block = block / np.sqrt((block ** 2).sum() + eps)
                pieces.append(block[:, i + 1 - a, j + 1 - b])                   # this cell's place in the block
            ref[i, j] = np.concatenate(pieces)
    out = hog.HOG(G).block_features(hist)                                     # (1, G*G, 36)
    np.testing.assert_allclose(out[0].numpy(), ref.reshape(G * G, 36), rtol=1e-6, atol=1e-9)

def test_hog_pieces_differ_across_a_contrast_edge():
    """The 4 pieces of a token are its cell normalised by 4 different blocks: equal in uniform texture,
    different next to a contrast edge (a per-piece renormalisation would make them unit-norm copies)."""
    enc = irepa.load_encoder('hog', grid_size=4)
    xs = torch.arange(32).float()
    stripes = ((xs // 2) % 2).view(1, 1, 1, 32).expand(1, 3, 32, 32)
    img = torch.where(xs.view(1, 1, 1, 32) < 16, 255 * stripes, 100 + 20 * stripes)  # strong left, weak right
    norms = enc(img)[0].view(4, 4, 4, 9).norm(dim=-1)                           # (row, col, piece)
    torch.testing.assert_close(norms[1, 0], torch.full((4,), 0.5))              # inside the strong texture: equal
    assert norms[1, 1].max() / norms[1, 1].min() > 1.3                          # at the edge: blocks differ
    assert norms[1, 2].max() / norms[1, 2].min() > 1.8                          # the weak side is outshone

def test_hog_tokens_follow_raster_order():
    enc = irepa.load_encoder('hog', grid_size=4)
    img = torch.zeros(1, 3, 32, 32)
    img[..., 8:16, 24:32] = 255                                            # a bright block in cell (row 1, col 3)
    energy = enc(img)[0].norm(dim=-1).view(4, 4)
    assert energy[1, 3] > 0 and energy[3, 0] == 0

def test_hog_an_edge_in_cell_r_c_shows_in_token_r_times_g_plus_c():
    """A 2x2 bright square inside cell (r, c) (its gradients stay inside the cell) gives a non-zero HOG token at
    r * G + c and nowhere else: the target's tokens are SiT's raster order (a transposed or mirrored order would
    light another token)."""
    enc = irepa.load_encoder('hog', grid_size=4)
    for r, c in ((0, 2), (3, 1), (2, 3), (1, 0)):
        img = torch.zeros(1, 3, 32, 32)
        img[..., 8 * r + 3:8 * r + 5, 8 * c + 3:8 * c + 5] = 255
        assert enc(img)[0].norm(dim=-1).nonzero().flatten().tolist() == [r * 4 + c], (r, c)
