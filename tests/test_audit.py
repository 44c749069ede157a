"""The one-run audit bound against the reference values of Steinke, Nasr & Jagielski (2023)."""

from __future__ import annotations

import pytest

from lightning_dp.audit import audit_p_value, epsilon_lower_bound


@pytest.mark.parametrize(
    "m, r, v, delta, expected",
    [(1000, 100, 100, 0.0, 3.4930), (1000, 100, 90, 0.0, 1.6308), (1000, 100, 90, 1e-5, 1.6261),
     (1000, 1000, 600, 1e-5, 0.2972)],
)
def test_reference_values(m: int, r: int, v: int, delta: float, expected: float) -> None:
    assert epsilon_lower_bound(m, r, v, delta, p=0.05) == pytest.approx(expected, abs=1e-4)


def test_the_bound_is_the_edge_of_what_the_data_rule_out() -> None:
    eps = epsilon_lower_bound(1000, 100, 90, 1e-5)
    assert audit_p_value(1000, 100, 90, eps - 1e-3, 1e-5) < 0.05 <= audit_p_value(1000, 100, 90, eps + 1e-3, 1e-5)


def test_chance_level_guessing_claims_nothing() -> None:
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 100, 0, 0.0) == 0.0


def test_more_correct_guesses_and_more_confidence_move_the_bound_the_right_way() -> None:
    assert epsilon_lower_bound(1000, 100, 95, 1e-5) > epsilon_lower_bound(1000, 100, 90, 1e-5)
    assert epsilon_lower_bound(1000, 100, 90, 1e-5, p=0.01) < epsilon_lower_bound(1000, 100, 90, 1e-5, p=0.05)


@pytest.mark.parametrize(
    "kw", [{"m": 10, "r": 20, "v": 5, "delta": 0.0}, {"m": 10, "r": 5, "v": 6, "delta": 0.0},
           {"m": 10, "r": 5, "v": 3, "delta": 1.0}, {"m": 10, "r": 5, "v": 3, "delta": 0.0, "p": 0.0},
           {"m": 10, "r": 0, "v": 0, "delta": 0.0}],
)
def test_bad_input_is_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        epsilon_lower_bound(**kw)
