"""The shared argument checks: the right error type, naming the argument, saying what it takes."""

from __future__ import annotations

import math

import pytest

from lightning_tricks import checks


@pytest.mark.parametrize(
    ("value", "error"),
    [(True, TypeError), (1.0, TypeError), ("3", TypeError), (0, ValueError), (11, ValueError)],
)
def test_integer_refuses_wrong_kind_and_range(value, error):
    with pytest.raises(error, match=r"`every_n` must be an integer >= 1 and <= 10; got"):
        checks.integer("every_n", value, minimum=1, maximum=10)


def test_integer_returns_the_value_and_allows_none_only_when_asked():
    assert checks.integer("n", 3, minimum=1) == 3
    assert checks.integer("n", None, allow_none=True) is None
    with pytest.raises(TypeError, match="`n` must be an integer"):
        checks.integer("n", None)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (False, TypeError),
        ("0.1", TypeError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (0.0, ValueError),
    ],
)
def test_real_refuses_non_finite_wrong_kind_and_range(value, error):
    with pytest.raises(error, match=r"`theta` must be a finite number > 0"):
        checks.real("theta", value, above=0)


def test_real_returns_a_float_within_bounds():
    assert checks.real("x", 1, minimum=1, maximum=2) == 1.0 and isinstance(checks.real("x", 1), float)
    with pytest.raises(ValueError, match=r"<= 2"):
        checks.real("x", 2.5, maximum=2)


def test_boolean_choice_and_sequence():
    assert checks.boolean("flag", False) is False
    with pytest.raises(TypeError, match="`flag` must be True or False; got 1"):
        checks.boolean("flag", 1)
    assert checks.choice("mode", "b", ("a", "b")) == "b"
    with pytest.raises(ValueError, match="`mode` must be one of 'a', 'b'; got 'c'"):
        checks.choice("mode", "c", ("a", "b"))
    assert checks.sequence("sizes", [1, 2]) == (1, 2)
    with pytest.raises(TypeError, match="`sizes` must be a list; got '12'"):
        checks.sequence("sizes", "12")


def test_loss_fn_needs_two_positional_arguments():
    def one(module): ...

    assert checks.loss_fn(None) is None
    with pytest.raises(TypeError, match="`loss_fn` must be None or a callable"):
        checks.loss_fn("mse")
    with pytest.raises(TypeError, match=r"`loss_fn` must be callable as `loss_fn\(module, batch\)`"):
        checks.loss_fn(one)
    assert checks.loss_fn(print) is print  # no inspectable signature: accepted


def test_integers_checks_every_item_and_the_length():
    assert checks.integers("sizes", [1, 2], minimum=1) == (1, 2)
    with pytest.raises(ValueError, match=r"`sizes\[1\]` must be an integer >= 1; got 0"):
        checks.integers("sizes", (4, 0), minimum=1)
    with pytest.raises(ValueError, match="`sizes` must be a list of 3 integers"):
        checks.integers("sizes", [1, 2], length=3)
    with pytest.raises(ValueError, match="at least one integer"):
        checks.integers("sizes", [])
    with pytest.raises(TypeError, match="`sizes` must be a list of integers; got 5"):
        checks.integers("sizes", 5)
