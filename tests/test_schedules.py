"""Per-epoch schedules against the formulas of caco.md §1 and §5 at chosen epochs."""

from __future__ import annotations

import math

import pytest

from caco.schedules import Schedules, ema_momentum, scaled_lr

PUBLISHED = dict(lr=0.3, final_lr=0.003, memory_lr=3.0, memory_lr_final=3.0, m0=0.99,
                 warmup_epochs=10, epochs=200, global_batch=1024)


def test_encoder_lr_warmup_then_cosine_to_one_hundredth():
    s = Schedules(**PUBLISHED)
    base = 0.3 * 1024 / 256
    assert s.base_lr == pytest.approx(1.2)
    assert s.at(0)["lr"] == pytest.approx(base / 10)
    assert s.at(4)["lr"] == pytest.approx(base * 5 / 10)
    assert s.at(9)["lr"] == pytest.approx(base)
    assert s.at(10)["lr"] == pytest.approx(base)
    final = base / 100
    assert s.at(105)["lr"] == pytest.approx(final + 0.5 * (base - final))
    e = 170
    expected = final + 0.5 * (1 + math.cos(math.pi * (e - 10) / 190)) * (base - final)
    assert s.at(e)["lr"] == pytest.approx(expected)
    assert s.at(199)["lr"] > final


def test_memory_lr_warms_up_then_stays_constant_and_ignores_batch():
    for batch in (256, 4096):
        s = Schedules(**{**PUBLISHED, "global_batch": batch})
        assert s.at(0)["memory_lr"] == pytest.approx(0.3)
        assert s.at(9)["memory_lr"] == pytest.approx(3.0)
        assert [s.at(e)["memory_lr"] for e in (10, 100, 199)] == pytest.approx([3.0] * 3)


def test_memory_lr_cosine_when_final_differs():
    s = Schedules(**{**PUBLISHED, "memory_lr_final": 1.0})
    assert s.at(105)["memory_lr"] == pytest.approx(1.0 + 0.5 * 2.0)


def test_ema_momentum_cosine_from_m0_to_one():
    assert ema_momentum(0, m0=0.99, epochs=200) == pytest.approx(0.99)
    assert ema_momentum(100, m0=0.99, epochs=200) == pytest.approx(0.995)
    assert ema_momentum(200, m0=0.99, epochs=200) == pytest.approx(1.0)
    assert ema_momentum(50, m0=0.99, epochs=200) == pytest.approx(
        1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.01)


def test_scaled_lr_linear_rule():
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)


@pytest.mark.parametrize(("key", "value"), [("epochs", 0), ("epochs", -3), ("global_batch", 0),
                                            ("warmup_epochs", -1), ("m0", 1.5)])
def test_bad_settings_are_refused_with_the_key_named(key, value):
    with pytest.raises(ValueError, match="must be"):
        Schedules(**{**PUBLISHED, key: value})
