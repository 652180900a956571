import math

import pytest

from salon.safety.stats import wilson


def test_wilson_matches_known_values() -> None:
    # Reference: Wilson 95 % interval for 8/100 = [0.0411, 0.1500] (Newcombe 1998 method 3)
    rate = wilson(8, 100)
    assert rate.value == pytest.approx(0.08)
    assert rate.low == pytest.approx(0.04110, abs=1e-4)
    assert rate.high == pytest.approx(0.15001, abs=1e-4)


def test_wilson_at_zero_and_all_hits_stays_in_unit_interval() -> None:
    zero = wilson(0, 50)
    assert zero.low == 0.0
    assert zero.high == pytest.approx(0.07135, abs=1e-4)
    full = wilson(50, 50)
    assert full.high == 1.0
    assert full.low == pytest.approx(1 - 0.07135, abs=1e-4)


def test_wilson_is_symmetric_and_handles_empty() -> None:
    a, b = wilson(3, 40), wilson(37, 40)
    assert math.isclose(a.low, 1 - b.high) and math.isclose(a.high, 1 - b.low)
    assert (wilson(0, 0).low, wilson(0, 0).high) == (0.0, 1.0)
