"""The transformer and the loss: shapes, causality, padding invariance, positional encodings, loss values."""
import math

import pytest
import torch
import torch.nn.functional as F

from train.blotch import IGNORE
from train.config import Config
from train.loss import token_loss
from train.build import build_model

V, W = 17, 12


def model(**kw):
    torch.manual_seed(0)
    cfg = Config(d_model=32, n_heads=4, n_layers=2, drop_p=0.0, **kw)
    return build_model(cfg, V, W).eval()


@pytest.mark.parametrize("posenc", ["SinPositionalEncoding", "RandPositionalEncoding"])
def test_causal_and_padding_invariant(posenc):
    m = model(posenc_type=posenc)
    ids = torch.randint(0, V, (3, W))
    pos = torch.arange(W).expand(3, W)
    mask = torch.ones(3, W, dtype=torch.bool)
    out = m(ids, pos, mask)
    assert out.shape == (3, W, V) and torch.isfinite(out).all()
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % V  # a future token must not change past logits
    torch.testing.assert_close(m(changed, pos, mask)[:, :7], out[:, :7])
    assert not torch.allclose(m(changed, pos, mask)[:, 7:], out[:, 7:])
    # right padding and fully padded rows: same logits on real tokens, no NaN anywhere
    padded = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], 1)
    pmask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], 1)
    pmask[2] = False
    pout = m(padded, torch.arange(W + 5).clamp(max=W - 1).expand(3, W + 5), pmask)  # padding repeats the last
    assert torch.isfinite(pout).all()
    torch.testing.assert_close(pout[:2, :W], out[:2])
    # holes in the key mask hide those keys
    holed = mask.clone()
    holed[:, 3] = False
    assert not torch.allclose(m(ids, pos, holed)[:, 5], out[:, 5])
    assert torch.equal(m(ids, pos, None), out)


def test_rand_posenc_random_in_training_its_mean_in_eval():
    """Training reads a sorted random subset of the table's rows; evaluation reads the rows training uses on
    average, spread over the whole table (not rows 0..S-1, which training almost never draws)."""
    m = model(posenc_type="RandPositionalEncoding", max_posencs=120)
    pe, pos = m.posenc, torch.arange(W).expand(2, W)
    torch.testing.assert_close(m.posenc(pos), pe.table[pe.rows(pos)])
    assert pe.rows(pos)[0].tolist() == [round((i + 1) * 121 / (W + 1)) - 1 for i in range(W)]
    pe.train()
    torch.manual_seed(1)
    a = pe(pos)
    torch.manual_seed(1)
    assert torch.equal(pe(pos), a)  # deterministic given the RNG state
    rows = [[int((pe.table == r).all(1).nonzero()) for r in seq] for seq in a]
    assert all(r == sorted(r) and len(set(r)) == W for r in rows) and rows[0] != rows[1]
    drawn = pe.rows(torch.arange(W).expand(4000, W)).double().mean(0)
    pe.eval()
    assert (drawn - pe.rows(pos)[0]).abs().max() < 1.5 and pe.rows(pos)[0, -1] > 100
    with pytest.raises(ValueError, match="max_posencs"):
        m.posenc(torch.arange(121)[None])
    with pytest.raises(ValueError, match="beyond the 12 positions of a row"):
        m.posenc(torch.arange(13)[None])


def test_learnable_posencs_and_tied_weights():
    assert "posenc.table" not in dict(model().named_parameters())
    assert "posenc.table" in dict(model(learnable_posencs=True).named_parameters())
    tied = model(tie_weights=True)
    assert tied.head.weight is tied.embed.weight


def test_token_loss_matches_cross_entropy():
    logits = torch.randn(2, 5, V)
    targets = torch.randint(0, V, (2, 5))
    targets[0, 3:] = IGNORE
    out = token_loss(logits, targets, label_smoothing=0.1)
    flat_l, flat_t = logits.view(-1, V), targets.view(-1)
    assert out.count == 8
    torch.testing.assert_close(out.nll, F.cross_entropy(flat_l, flat_t, ignore_index=IGNORE, reduction="sum"))
    torch.testing.assert_close(out.objective, F.cross_entropy(flat_l, flat_t, ignore_index=IGNORE,
                                                              reduction="sum", label_smoothing=0.1))
    keep = flat_t != IGNORE
    assert out.correct == (flat_l[keep].argmax(-1) == flat_t[keep]).sum()
    assert math.isclose(token_loss(torch.zeros(1, 2, V), torch.tensor([[1, 2]])).nll.item() / 2, math.log(V),
                        rel_tol=1e-6)
