"""`make` and `train_step`: every name trains under jit and vmap; bad input is refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import transforms as tx
from transforms import registry
from tests.landscape.models import ce_loss, classification_data, mlp_apply, mlp_params

PARAMS = mlp_params(jax.random.key(0))
BATCH = classification_data(jax.random.key(1))
LR = {"sgd": 0.3, "momentum": 0.1, "adam": 1e-2, "adamw": 1e-2, "lion": 3e-2,
      "sam": 0.3, "asam": 0.3, "gsam": 0.3, "sophia_h": 1e-2, "sophia_g": 1e-2,
      "adahessian": 0.1}
EXTRA = {"adahessian": {"update_interval": 3}, "sophia_h": {"update_interval": 3},
         "sophia_g": {"update_interval": 3}}


def final_loss(name, lr, steps=20, params=PARAMS, **hyper):
    opt = tx.make(name, learning_rate=lr, **EXTRA.get(name, {}), **hyper)
    step = functools.partial(tx.train_step, opt, ce_loss, apply_fn=mlp_apply)

    def body(carry, t):
        p, s = carry
        p, s, loss = step(p, s, BATCH, jax.random.fold_in(jax.random.key(7), t))
        return (p, s), loss

    (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), jnp.arange(steps))
    return ce_loss(p, BATCH)


def test_the_built_in_names_are_registered():
    assert set(LR) <= set(tx.names())


@pytest.mark.parametrize("name", sorted(LR))
def test_every_name_trains_under_jit_and_vmap_over_learning_rate(name):
    start = float(ce_loss(PARAMS, BATCH))
    single = jax.jit(functools.partial(final_loss, name))(LR[name])
    assert float(single) < 0.9 * start
    lrs = jnp.array([LR[name], 0.5 * LR[name]])
    swept = jax.jit(jax.vmap(functools.partial(final_loss, name)))(lrs)
    assert np.all(np.asarray(swept) < 0.9 * start)
    np.testing.assert_allclose(swept[0], single, rtol=1e-8)


def test_lion_trains_with_a_learning_rate_several_times_below_adams():
    adam_lr, start = 0.1, float(ce_loss(PARAMS, BATCH))
    adam = float(jax.jit(functools.partial(final_loss, "adam", steps=100))(adam_lr))
    lion = jax.jit(jax.vmap(functools.partial(final_loss, "lion", steps=100)))(
        jnp.array([adam_lr / 3, adam_lr / 10]))
    assert adam < 0.05
    assert np.all(np.asarray(lion) < 0.5 * start)   # both rates train
    assert float(lion[0]) < 0.15                     # 3x below Adam's rate comes close


def test_sophia_h_hyperparameters_reach_optax():
    # Through make with a traced gamma under vmap, against optax's own transform.
    def via_make(gamma):
        opt = tx.make("sophia_h", learning_rate=1e-2, gamma=gamma)
        return tx.train_step(opt, ce_loss, PARAMS, opt.init(PARAMS), BATCH,
                             jax.random.key(0)).params

    got = jax.jit(jax.vmap(via_make))(jnp.array([0.01, 0.2]))
    for i, gamma in enumerate((0.01, 0.2)):
        ref = optax.contrib.sophia(1e-2, gamma=gamma)

        @jax.jit
        def ref_step(params):
            u, _ = ref.update(jax.grad(ce_loss)(params, BATCH), ref.init(params), params,
                              obj_fn=lambda p: ce_loss(p, BATCH))
            return optax.apply_updates(params, u)

        want = ref_step(PARAMS)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a[i], b, atol=1e-12)


@pytest.mark.parametrize("name, hyper, match", [
    ("nadamm", {"learning_rate": 0.1}, "Unknown optimizer 'nadamm'; valid choices: Basin's adahessian"),
    ("muon", {"learning_rate": 0.1, "bta": 0.9}, r"'bta' for 'muon' \(optax.contrib\); "
     "valid: learning_rate, ns_coeffs, ns_steps, beta"),
    ("muon", {"beta": 0.9}, "'muon' needs `learning_rate`"),
    ("adabelief", {"learning_rate": -1.0}, "`learning_rate` must be a number > 0"),
    ("sam", {"learning_rate": 0.1, "rh0": 0.1}, "valid: learning_rate, rho"),
    ("sam", {}, "needs `learning_rate`"),
    ("sgd", {"learning_rate": -0.1}, "`learning_rate` must be a number > 0"),
    ("sgd", {"learning_rate": float("nan")}, "`learning_rate`"),
    ("sgd", {"learning_rate": jnp.ones(3)}, "scalar"),
    ("adam", {"learning_rate": 0.1, "b1": 1.0}, r"`b1` must be a number in \[0, 1\)"),
    ("sam", {"learning_rate": 0.1, "rho": -0.05}, "`rho` must be a number >= 0"),
    ("asam", {"learning_rate": 0.1, "eta": 0.0}, "`eta` must be a number > 0"),
    ("sam", {"learning_rate": 0.1, "num_chunks": 2.5}, "`num_chunks` must be a positive"),
    ("sophia_h", {"learning_rate": 0.1, "update_interval": 0}, "`update_interval`"),
    ("sophia_g", {"learning_rate": 0.1, "loss": "hinge"},
     "`loss` must be one of 'cross_entropy', 'mse'"),
    ("adahessian", {"learning_rate": 0.1, "hessian_power": 1.5}, r"in \(0, 1\]"),
    ("momentum", {"learning_rate": 0.1, "nesterov": "yes"}, "`nesterov` must be True"),
])
def test_bad_names_and_values_raise_value_error(name, hyper, match):
    with pytest.raises(ValueError, match=match):
        tx.make(name, **hyper)


@pytest.mark.parametrize("factory, hyper, static", [
    (tx.gsam, {"learning_rate": 0.1, "rho": 0.05, "alpha": 0.2}, ()),
    (tx.asam, {"learning_rate": 0.1}, ()),
    (tx.adahessian, {"learning_rate": 0.01, "update_interval": 2}, ("update_interval",)),
    (tx.sophia_g, {"learning_rate": 0.01}, ("update_interval",)),
])
def test_inject_hyperparams_gives_the_same_steps(factory, hyper, static):
    injected = optax.inject_hyperparams(factory, static_args=static)(**hyper)
    plain = factory(**hyper)
    run = lambda opt: jax.jit(functools.partial(  # noqa: E731
        tx.train_step, opt, ce_loss, apply_fn=mlp_apply))
    a, b = run(injected), run(plain)
    pa, sa, pb, sb = PARAMS, injected.init(PARAMS), PARAMS, plain.init(PARAMS)
    for t in range(3):
        pa, sa, _ = a(pa, sa, BATCH, jax.random.key(t))
        pb, sb, _ = b(pb, sb, BATCH, jax.random.key(t))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, atol=1e-12)


@pytest.mark.parametrize("build, match", [
    (lambda: tx.sharpness_aware(rho=-1.0), "`rho`"),
    (lambda: tx.gsam(0.1, alpha=-0.1), "`alpha`"),
    (lambda: tx.asam_ascent(eta=-0.01), "`eta`"),
    (lambda: tx.scale_by_adahessian(b2=1.0), "`b2`"),
    (lambda: tx.sophia_h(0.1, update_interval=0), "`update_interval`"),
])
def test_constructors_validate_directly(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_traced_hyperparameters_skip_range_checks_but_not_shape_checks():
    jax.vmap(lambda lr: tx.make("adam", learning_rate=lr).init(PARAMS))(jnp.ones(2))
    with pytest.raises(ValueError, match="scalar"):
        jax.vmap(lambda lr: tx.make("adam", learning_rate=lr).init(PARAMS))(jnp.ones((2, 3)))


def test_schedules_are_accepted_and_read_each_step():
    sched = optax.linear_schedule(0.1, 0.0, 2)
    got = float(jax.jit(lambda: final_loss("sgd", sched, steps=5))())
    at_two = float(jax.jit(lambda: final_loss("sgd", sched, steps=2))())
    assert got == pytest.approx(at_two, rel=1e-12)  # the rate is 0 from step 2 on


def test_register_extends_make():
    def scaled_sign(learning_rate, power):
        return optax.chain(optax.scale_by_sign(), optax.scale(-learning_rate * power))

    registry.register("scaled_sign", scaled_sign, {
        "learning_rate": tx.Hyper(tx.REQUIRED, registry.positive),
        "power": tx.Hyper(2.0, registry.positive)})
    try:
        assert "scaled_sign" in tx.names()
        assert tx.hyperparameters("scaled_sign") == {"learning_rate": tx.REQUIRED,
                                                     "power": 2.0}
        opt = tx.make("scaled_sign", learning_rate=0.1)
        out = tx.train_step(opt, ce_loss, PARAMS, opt.init(PARAMS), BATCH, jax.random.key(0))
        g = jax.grad(ce_loss)(PARAMS, BATCH)
        for a, p, gi in zip(*map(jax.tree.leaves, (out.params, PARAMS, g))):
            np.testing.assert_allclose(a, p - 0.2 * np.sign(gi))
        with pytest.raises(ValueError, match="already registered"):
            registry.register("scaled_sign", scaled_sign, {})
    finally:
        registry._REGISTRY.pop("scaled_sign", None)


def test_train_step_contract():
    seen = {}

    def spy_update(updates, state, params=None, **extra):
        seen.update(extra)
        return jax.tree.map(jnp.zeros_like, updates), state

    spy = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), spy_update)
    out = tx.train_step(spy, ce_loss, PARAMS, spy.init(PARAMS), BATCH, jax.random.key(3),
                        apply_fn=mlp_apply, extra_args={"stats": 1})
    assert float(out.loss) == pytest.approx(float(ce_loss(PARAMS, BATCH)), rel=1e-12)
    assert set(seen) == {"grad_fn", "obj_fn", "loss_fn", "batch", "apply_fn", "output_fn",
                         "key", "stats"}
    np.testing.assert_allclose(seen["obj_fn"](PARAMS), ce_loss(PARAMS, BATCH))
    np.testing.assert_allclose(seen["output_fn"](PARAMS), mlp_apply(PARAMS, BATCH[0]))
    for a, b in zip(jax.tree.leaves(seen["grad_fn"](PARAMS, 0)),
                    jax.tree.leaves(jax.grad(ce_loss)(PARAMS, BATCH))):
        np.testing.assert_allclose(a, b)
    with pytest.raises(ValueError, match="redefine"):
        tx.train_step(spy, ce_loss, PARAMS, spy.init(PARAMS), BATCH, jax.random.key(3),
                      extra_args={"key": 1})
    with pytest.raises(ValueError, match="inputs, labels"):
        tx.train_step(spy, ce_loss, PARAMS, spy.init(PARAMS), {"x": BATCH[0]},
                      jax.random.key(3), apply_fn=mlp_apply)
    tx.train_step(spy, ce_loss, PARAMS, spy.init(PARAMS), BATCH, jax.random.key(3),
                  step=jnp.int32(7))
    assert int(seen["step"]) == 7
    with pytest.raises(ValueError, match="`step` must be an integer scalar"):
        tx.train_step(spy, ce_loss, PARAMS, spy.init(PARAMS), BATCH, jax.random.key(3),
                      step=1.5)


def _optax_steps(opt, steps=3):
    """`steps` plain optax steps: gradient, `opt.update`, apply."""
    p, s = PARAMS, opt.init(PARAMS)
    for _ in range(steps):
        u, s = opt.update(jax.grad(ce_loss)(p, BATCH), s, p)
        p = optax.apply_updates(p, u)
    return p


@pytest.mark.parametrize("name, hyper, reference", [
    ("muon", {"learning_rate": 0.02, "beta": 0.9},
     lambda: optax.contrib.muon(0.02, beta=0.9)),
    ("schedule_free_adamw", {"learning_rate": 1e-2, "warmup_steps": 2},
     lambda: optax.contrib.schedule_free_adamw(1e-2, warmup_steps=2)),
    ("nadam", {"learning_rate": 1e-2}, lambda: optax.nadam(1e-2)),
])
def test_optax_optimizers_by_name_equal_optax_own(name, hyper, reference):
    opt = tx.make(name, **hyper)
    p, s = PARAMS, opt.init(PARAMS)
    step = jax.jit(functools.partial(tx.train_step, opt, ce_loss, apply_fn=mlp_apply,
                                     step=None))
    for t in range(3):
        p, s, _ = step(p, s, BATCH, jax.random.key(t))
    want = _optax_steps(reference())
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_optax_optimizer_by_name_under_vmap_over_learning_rates():
    def run(lr):
        opt = tx.make("muon", learning_rate=lr)
        p, s = PARAMS, opt.init(PARAMS)
        for t in range(3):
            p, s, _ = tx.train_step(opt, ce_loss, p, s, BATCH, jax.random.key(t),
                                    step=t)
        return p

    lrs = jnp.array([0.01, 0.05])
    swept = jax.jit(jax.vmap(run))(lrs)
    for i, lr in enumerate((0.01, 0.05)):
        want = _optax_steps(optax.contrib.muon(lr))
        for a, b in zip(jax.tree.leaves(swept), jax.tree.leaves(want)):
            np.testing.assert_allclose(a[i], b, rtol=1e-9, atol=1e-12)


def test_describe_lists_every_name_with_its_hyperparameters():
    table = {name: (source, hyper) for name, source, hyper in tx.describe()}
    assert table["sam"] == ("basin", tx.hyperparameters("sam"))
    assert table["adam"][0] == "basin"          # Basin's registry comes first
    assert table["muon"][0] == "optax.contrib"
    assert table["muon"][1]["learning_rate"] is tx.REQUIRED
    assert table["muon"][1]["beta"] == 0.95     # optax's own default
    assert table["adafactor"][0] == "optax"
    for name in ("schedule_free_adamw", "ademamix", "adopt", "prodigy", "lion", "kfac"):
        assert name in table
    # not optimizers: building blocks, combinators, wrappers, schedules, losses
    for name in ("chain", "clip", "scale_by_adam", "scale_by_learning_rate",
                 "schedule_free", "cosine_decay_schedule", "l2_loss", "scale_by_madgrad"):
        assert name not in table
    assert set(tx.names()) <= set(table) and not set(tx.names()) & set(
        registry.optax_names())


def test_plain_optax_transform_through_train_step():
    opt = optax.adam(1e-2)                        # no extra-args support of its own
    out = tx.train_step(opt, ce_loss, PARAMS, opt.init(PARAMS), BATCH, jax.random.key(0),
                        apply_fn=mlp_apply, step=0)
    want = _optax_steps(optax.adam(1e-2), steps=1)
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
