"""Learning-rate schedules and the optimizer's parameter groups."""
import math

import pytest

from train.config import Config
from train.build import build_model
from train.optim import Schedule, build_optimizer


def lrs(total=100, **kw):
    s = Schedule(Config(lr=1.0, **kw), total)
    return s, [s.lr(t) for t in range(total)]


def test_warmup_then_cosine_to_min_lr():
    _, v = lrs(warmup_steps=10, min_lr=0.1)
    assert v[:10] == pytest.approx([(t + 1) / 10 for t in range(10)])
    assert v[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(v[10:], v[11:]))
    assert v[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert Schedule(Config(lr=1.0, warmup_steps=10, min_lr=0.1), 100).lr(100) == pytest.approx(0.1)


def test_inverse_sqrt_and_constant():
    _, v = lrs(warmup_steps=4, lr_schedule="inverse_sqrt", min_lr=0.3)
    assert v[3] == pytest.approx(1.0) and v[15] == pytest.approx(0.5) and v[99] == pytest.approx(0.3)
    assert set(lrs(lr_schedule="constant")[1]) == {1.0}


def test_inverse_power_is_the_papers_schedule():
    """Chain of Shortcuts: 2,500 warmup steps, then 0.0045 * (2500 / step) ** 0.1."""
    s = Schedule(Config(lr=0.0045, warmup_steps=2500, lr_schedule="inverse_power", lr_decay_exp=0.1), 31000)
    assert s.lr(1249) == pytest.approx(0.0045 / 2)
    for step in (2500, 10000, 31000):
        assert s.lr(step - 1) == pytest.approx(0.0045 * (2500 / step) ** 0.1)


def test_plateau_divides_after_patience_and_resumes():
    s, _ = lrs(lr_schedule="plateau", patience=2, min_lr=0.005)
    for loss in (3.0, 2.0, 1.9999, 2.5):  # the last two do not improve by 0.1 %
        s.on_validation(loss)
    assert s.lr(50) == pytest.approx(0.1)
    restored = Schedule(Config(lr=1.0, lr_schedule="plateau", patience=2, min_lr=0.005), 100)
    restored.load_state_dict(s.state_dict())
    for loss in (2.5, 2.5, 2.5, 2.5):
        restored.on_validation(loss)
    assert restored.lr(50) == pytest.approx(0.005)  # 0.001 would be below min_lr


def test_weight_decay_only_on_matrices():
    model = build_model(Config(d_model=16, n_heads=2, n_layers=1, l2=0.1), 10, 8)
    decay, no_decay = build_optimizer(Config(l2=0.1), model).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
