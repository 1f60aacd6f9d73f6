"""The one vocabulary of argument checks (`landscape._validate`), used by both packages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import _validate as v

NUMERIC = [  # check, good values, bad values, expected phrase
    (v.positive, [1e-3, 2, np.float32(0.5), jnp.asarray(3.0)], [0, -1.0, np.inf, np.nan],
     "a number > 0"),
    (v.nonnegative, [0, 0.0, 5.0], [-1e-9, np.inf], "a number >= 0"),
    (v.unit_interval, [0.0, 0.999], [1.0, -0.1], r"a number in \[0, 1\)"),
    (v.closed_unit_interval, [0.0, 1.0], [1.01, -0.1], r"a number in \[0, 1\]"),
    (v.fraction, [1.0, 1e-6], [0.0, 1.5], r"a number in \(0, 1\]"),
    (v.number, [-3.0, 0], [np.inf], "a finite number"),
]


@pytest.mark.parametrize("check, good, bad, phrase", NUMERIC)
def test_numeric_checks_return_the_value_and_name_the_argument(check, good, bad, phrase):
    for value in good:
        assert check(value, "arg") is value          # never converted (no float())
    for value in bad + [True, "0.1", [0.1], jnp.ones(2), 1 + 2j]:
        with pytest.raises(ValueError, match="`arg` must be"):
            check(value, "arg")
    with pytest.raises(ValueError, match=f"`arg` must be {phrase}"):
        check(bad[0], "arg")


@pytest.mark.parametrize("check", [c for c, *_ in NUMERIC])
def test_numeric_checks_accept_tracers_and_keep_them_traced(check):
    seen = []

    def f(x):
        out = check(x, "lr")
        seen.append(isinstance(out, jax.core.Tracer))
        return out * 2

    np.testing.assert_allclose(jax.vmap(f)(jnp.asarray([0.5, 0.25])), [1.0, 0.5])
    jax.jit(f)(0.5)
    assert all(seen)
    with pytest.raises(ValueError, match="`lr` must be a scalar"):
        jax.vmap(f)(jnp.ones((2, 3)))


@pytest.mark.parametrize("check, good, bad", [
    (v.positive_int, [1, np.int64(7)], [0, -1, 2.0, True, jnp.asarray(3)]),
    (v.nonnegative_int, [0, 3], [-1, 0.0, False]),
    (v.integer, [-2, 0], [1.5, "1", None]),
])
def test_integer_checks_are_static(check, good, bad):
    for value in good:
        assert check(value, "n") == value and type(check(value, "n")) is int
    for value in bad:
        with pytest.raises(ValueError, match="`n` must be"):
            check(value, "n")


def test_static_choices_and_combinators():
    assert v.boolean(np.bool_(True), "flag") is True
    with pytest.raises(ValueError, match="`flag` must be True or False"):
        v.boolean(1, "flag")
    assert v.choice("exact", "tikhonov", ("factored", "exact")) == "exact"
    with pytest.raises(ValueError, match="`tikhonov` must be one of 'factored', 'exact'"):
        v.choice("none", "tikhonov", ("factored", "exact"))
    with pytest.raises(ValueError, match="`tikhonov` must be one of"):
        v.choice(["exact"], "tikhonov", ("factored", "exact"))
    assert v.one_of("a", "b")("b", "x") == "b"
    assert v.optional(v.positive)(None, "x") is None
    schedule = lambda t: 0.1  # noqa: E731
    assert v.schedule_or(v.positive)(schedule, "lr") is schedule
    with pytest.raises(ValueError, match="`lr`"):
        v.schedule_or(v.positive)(-1.0, "lr")
