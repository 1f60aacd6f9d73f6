"""ls.linear_barrier and ls.connect against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import landscape as ls

DATA = jnp.zeros((8, 1))  # the test losses ignore their batch


def _wave(params, batch):
    w = params["w"]
    return jnp.sin(jnp.pi * w[0]) + 0.5 * w[1] + 0.0 * jnp.mean(batch)


def _ring(params, batch):
    return (jnp.sum(params["x"] ** 2) - 1.0) ** 2 + 0.0 * jnp.mean(batch)


def test_linear_barrier_of_a_known_function():
    # Along (0, 0) -> (1, 2) the loss is sin(πt) + t: the endpoint losses are 0 and 1,
    # so the rise above their line is sin(πt), largest (1) at t = ½.
    a, b = {"w": jnp.zeros(2)}, {"w": jnp.array([1.0, 2.0])}
    path = ls.linear_barrier(_wave, a, b, DATA, num_points=41, metric=_wave)
    t = np.linspace(0, 1, 41)
    want = np.sin(np.pi * t) + t
    np.testing.assert_allclose(path.t, t, atol=1e-15)
    np.testing.assert_allclose(path.loss, want, atol=1e-12)
    np.testing.assert_allclose(path.metric, want, atol=1e-12)
    np.testing.assert_allclose(path.barrier, 1.0, atol=1e-12)
    # Frankle et al.'s version subtracts the endpoints' mean, ½.
    np.testing.assert_allclose(path.barrier_mean, want.max() - 0.5, atol=1e-12)
    # A convex loss has no barrier.
    flat = ls.linear_barrier(lambda p, _: jnp.sum(p["w"] ** 2), a, b, DATA)
    assert float(flat.barrier) <= 1e-12


RING_A, RING_B = {"x": jnp.array([1.0, 0.0])}, {"x": jnp.array([-1.0, 0.0])}


@pytest.mark.timeout(120)
def test_bezier_curve_goes_round_the_ring():
    # L(x) = (‖x‖² − 1)²: the straight path through the origin rises to L(0) = 1, while
    # a quadratic Bezier curve with control point (0, ±c) stays within (4u(c²u − 1))²,
    # u = t(1 − t), whose mean over t is smallest at c² = 4.5 with a maximum of 0.0494:
    # no curve trained on the mean loss does better, so allow 10% above that.
    line = ls.linear_barrier(_ring, RING_A, RING_B, DATA)
    np.testing.assert_allclose(line.barrier, 1.0, atol=1e-12)
    steps = 1000
    opt = optax.adam(optax.cosine_decay_schedule(0.05, steps))
    curve = ls.connect(_ring, RING_A, RING_B, DATA, key=jax.random.key(0), steps=steps,
                       optimizer=opt, num_points=41, t_samples=8)
    assert float(curve.barrier) < 1.1 * 0.0494
    assert abs(float(curve.control["x"][0])) < 0.03
    np.testing.assert_allclose(abs(float(curve.control["x"][1])), np.sqrt(4.5), rtol=0.02)
    # The endpoints are exact, and the loss on the grid is the loss at params_at(t).
    for t, end in ((0.0, RING_A), (1.0, RING_B)):
        np.testing.assert_array_equal(curve.params_at(t)["x"], end["x"])
    np.testing.assert_allclose(curve.loss[::10], [_ring(curve.params_at(t), DATA)
                                                  for t in np.asarray(curve.t)[::10]],
                               rtol=1e-12)
    np.testing.assert_allclose(curve.along(_ring, DATA), curve.loss, rtol=1e-12)
    assert curve.train_loss.shape == (steps,)


def test_polychain_endpoints_and_shape():
    control = {"x": jnp.array([0.3, 0.7])}
    for t, want in ((0.0, RING_A["x"]), (1.0, RING_B["x"])):
        np.testing.assert_array_equal(
            ls.curve_point("polychain", RING_A, control, RING_B, t)["x"], want)
    np.testing.assert_allclose(
        ls.curve_point("polychain", RING_A, control, RING_B, 0.5)["x"], control["x"],
        atol=1e-15)
    np.testing.assert_allclose(
        ls.curve_point("polychain", RING_A, control, RING_B, 0.25)["x"],
        0.5 * (RING_A["x"] + control["x"]), atol=1e-15)
    np.testing.assert_allclose(
        ls.curve_point("bezier", RING_A, control, RING_B, 0.5)["x"],
        0.25 * RING_A["x"] + 0.5 * control["x"] + 0.25 * RING_B["x"], atol=1e-15)
    # A trained polychain with minibatches also ends below the straight path's barrier.
    curve = ls.connect(_ring, RING_A, RING_B, DATA, key=jax.random.key(1),
                       kind="polychain", steps=300, batch_size=4,
                       optimizer=optax.adam(optax.cosine_decay_schedule(0.05, 300)))
    assert float(curve.barrier) < 0.5
    np.testing.assert_array_equal(curve.params_at(1.0)["x"], RING_B["x"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind"):
        ls.connect(_ring, RING_A, RING_B, DATA, key=jax.random.key(0), kind="spline")
    with pytest.raises(ValueError, match="batch_size"):
        ls.connect(_ring, RING_A, RING_B, DATA, key=jax.random.key(0), batch_size=9)
    with pytest.raises(ValueError, match="params_b"):
        ls.connect(_ring, RING_A, {"y": jnp.zeros(2)}, DATA, key=jax.random.key(0))
    with pytest.raises(ValueError, match="optimizer"):
        ls.connect(_ring, RING_A, RING_B, DATA, key=jax.random.key(0), optimizer="adam")
    with pytest.raises(ValueError, match="num_points"):
        ls.linear_barrier(_ring, RING_A, RING_B, DATA, num_points=1)
