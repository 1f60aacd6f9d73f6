"""One group of a sweep as one jitted program: `lax.scan` over steps, `vmap` over members.

Members of a group share shapes (batch size, model, optimizer) and differ in vmapped
values (learning rate, seed, numeric optimizer hyper-parameters). Mini-batches are
gathered on device from a permutation drawn at each epoch boundary (exact epochs; the
last partial batch of each epoch is dropped). A member whose loss or parameters become
non-finite, or whose mini-batch loss exceeds `diverge_above`, is marked diverged and
frozen; one that reaches `until_train_loss` (mean mini-batch loss over a record window)
is marked converged and frozen; the others go on.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import landscape as ls
import transforms as tx
from experiments.models import CNN1D, MLP, ResNet1D, Transformer1D, pure

RUNNING, DIVERGED, CONVERGED = 0, 1, 2
STATUS_NAMES = {RUNNING: "finished", DIVERGED: "diverged", CONVERGED: "converged"}


class Model(NamedTuple):
    apply_fn: Callable[[Any, Any], Any]
    init: Callable[[jax.Array], Any]


def build_model(model_cfg: dict, num_features: int, num_classes: int) -> Model:
    """The config's model as pure `apply_fn(params, x)` and `init(key) -> params`."""
    name = model_cfg["name"]
    if name == "mlp":
        def construct(rngs):
            return MLP((num_features, *model_cfg["hidden"], num_classes),
                       activation=model_cfg["activation"], rngs=rngs)
    elif name in ("cnn", "cnn_bn"):
        def construct(rngs):
            return CNN1D(num_classes, tuple(model_cfg["channels"]),
                         kernel_size=model_cfg["kernel_size"],
                         activation=model_cfg["activation"], batch_norm=name == "cnn_bn",
                         rngs=rngs)
    elif name == "transformer":
        def construct(rngs):
            return Transformer1D(num_classes, length=num_features,
                                 patch_size=model_cfg["patch_size"],
                                 dim=model_cfg["embed_dim"], depth=model_cfg["num_blocks"],
                                 num_heads=model_cfg["num_heads"], rngs=rngs)
    else:
        def construct(rngs):
            return ResNet1D(num_classes, width=model_cfg["width"], depth=model_cfg["depth"],
                            kernel_size=model_cfg["kernel_size"], skip=model_cfg["skip"],
                            rngs=rngs)
    # BatchNorm models train and are measured in train mode (batch statistics; see
    # docs/notes/models_and_memory.md): the function SGD optimizes.
    apply_fn, _ = pure(construct(nnx.Rngs(0)), mode="train")
    return Model(apply_fn, lambda key: pure(construct(nnx.Rngs(key)), mode="train")[1])


def loss_function(apply_fn, loss: str):
    fn = {"cross_entropy": ls.cross_entropy, "mse": ls.mse}[loss]

    def loss_fn(params, batch):
        inputs, targets = batch
        if loss == "mse":  # regression on one-hot targets; only the output width is needed
            width = jax.eval_shape(apply_fn, params, inputs[:1]).shape[-1]
            targets = jax.nn.one_hot(targets, width)
        return fn(apply_fn(params, inputs), targets)

    return loss_fn


def build_optimizer(opt_cfg: dict, hyper: dict[str, jax.Array], total_steps: int,
                    layers: tuple = ()) -> optax.GradientTransformation:
    """The member's optimizer from `transforms.make`; `hyper` holds its vmapped (traced)
    hyper-parameters. `schedule = "cosine"` decays the learning rate to zero over the
    training budget. `layers` are the model's dense layers, which K-FAC needs."""
    kw = {k: v for k, v in opt_cfg.items() if k not in ("name", "schedule")}
    if opt_cfg["name"] == "kfac":
        kw["layers"] = layers
    kw.update(hyper)
    if opt_cfg.get("schedule", "constant") == "cosine":
        kw["learning_rate"] = optax.cosine_decay_schedule(kw["learning_rate"], total_steps)
    return tx.make(opt_cfg["name"], **kw)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


class GroupOutput(NamedTuple):
    params: Any  # stacked over members
    status: jax.Array  # (M,) int
    steps: jax.Array  # (M,) steps taken
    curve: jax.Array  # (M, R) mean mini-batch loss per record window (NaN once stopped)


def total_steps(train_cfg: dict, num_train: int, batch_size: int) -> int:
    if train_cfg["epochs"] > 0:
        return train_cfg["epochs"] * (num_train // batch_size)
    return train_cfg["steps"]


def make_group_program(model: Model, opt_cfg: dict, train_cfg: dict, batch_size: int,
                       x: jax.Array, y: jax.Array,
                       on_window: Callable[[Any], None] | None = None) -> Callable:
    """`program(hyper: dict of (M,) arrays, seeds: (M,) ints) -> GroupOutput`, jitted.

    `on_window(r)` is called on the host after each record window (progress bars).
    """
    n = x.shape[0]
    per_epoch = n // batch_size
    steps = total_steps(train_cfg, n, batch_size)
    every = train_cfg["record_every"]
    records = math.ceil(steps / every)
    target = float(train_cfg["until_train_loss"])
    diverge_above = float(train_cfg["diverge_above"])
    loss_fn = loss_function(model.apply_fn, train_cfg["loss"])
    layers = (tx.find_dense_layers(model.apply_fn, model.init(jax.random.key(0)), x[:1])
              if opt_cfg["name"] == "kfac" else ())

    def start(hyper, seed):
        # Three streams from the seed: initialization, data order, the optimizer's own
        # randomness (probes, sampled labels).
        k_init, k_data, k_step = jax.random.split(jax.random.key(seed), 3)
        params = model.init(k_init)
        opt_state = build_optimizer(opt_cfg, hyper, steps, layers).init(params)
        return params, opt_state, jnp.arange(n), jnp.asarray(RUNNING), jnp.stack(
            [k_data, k_step])

    def window(r, hyper, params, opt_state, perm, status, keys):
        k_data, k_step = keys[0], keys[1]
        """`every` steps of one member; `r` (the window index) is shared by all members."""
        opt = build_optimizer(opt_cfg, hyper, steps, layers)

        def step(carry, t):
            params, opt_state, perm, status, total, count = carry
            epoch, pos = t // per_epoch, t % per_epoch
            perm = jax.lax.cond(
                pos == 0, lambda: jax.random.permutation(jax.random.fold_in(k_data, epoch), n),
                lambda: perm)
            idx = jax.lax.dynamic_slice_in_dim(perm, pos * batch_size, batch_size)
            new_params, new_state, loss = tx.train_step(
                opt, loss_fn, params, opt_state, (x[idx], y[idx]),
                jax.random.fold_in(k_step, t), apply_fn=model.apply_fn)
            active = (status == RUNNING) & (t < steps)
            finite = (jnp.isfinite(loss) & (loss <= diverge_above)
                      & _all_finite(new_params))
            status = jnp.where(active & ~finite, DIVERGED, status)
            keep = active & finite
            params = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new_params, params)
            opt_state = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new_state, opt_state)
            total = total + jnp.where(keep, loss, 0.0)
            return (params, opt_state, perm, status, total, count + keep), None

        zero = jnp.zeros((), jnp.float32)
        (params, opt_state, perm, status, total, count), _ = jax.lax.scan(
            step, (params, opt_state, perm, status, zero, jnp.zeros((), jnp.int32)),
            r * every + jnp.arange(every))
        mean = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
        if target > 0:
            status = jnp.where((status == RUNNING) & (mean < target), CONVERGED, status)
        return params, opt_state, perm, status, mean, count

    @jax.jit
    def program(hyper, seeds):
        params, opt_state, perm, status, keys = jax.vmap(start)(hyper, seeds)
        m = seeds.shape[0]

        # The window loop sits outside vmap so its counter stays shared (the epoch
        # permutation's `cond` stays a branch) and the group stops once every member has.
        def going(carry):
            r, _, _, _, status, _, _ = carry
            return (r < records) & jnp.any(status == RUNNING)

        def body(carry):
            r, params, opt_state, perm, status, curve, taken = carry
            if on_window is not None:
                jax.debug.callback(on_window, r)
            params, opt_state, perm, status, mean, count = jax.vmap(
                window, in_axes=(None, 0, 0, 0, 0, 0, 0))(r, hyper, params, opt_state, perm,
                                                          status, keys)
            return (r + 1, params, opt_state, perm, status, curve.at[:, r].set(mean),
                    taken + count)

        init = (jnp.asarray(0), params, opt_state, perm, status,
                jnp.full((m, records), jnp.nan, jnp.float32), jnp.zeros((m,), jnp.int32))
        _, params, _, _, status, curve, taken = jax.lax.while_loop(going, body, init)
        return GroupOutput(params, status, taken, curve)

    return program
