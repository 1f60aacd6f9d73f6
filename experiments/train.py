"""One group of a sweep as one jitted program: `lax.scan` over steps, `vmap` over members.

Members of a group share shapes (batch size, model, optimizer) and differ in vmapped
values (learning rate, seed, numeric optimizer hyper-parameters). Mini-batches are
gathered on device from a permutation drawn at each epoch boundary (exact epochs; the
last partial batch of each epoch is dropped). A member whose loss or parameters become
non-finite, or whose mini-batch loss exceeds `diverge_above`, is marked diverged and
frozen; one that reaches `until_train_loss` (mean mini-batch loss over a record window)
is marked converged and frozen; the others go on.

At the end of every record window each member's loss and accuracy on the test set are
taken (the curves behind early stopping's record). With `record_cfg["every"] > 0` the
program also measures curvature along training (λ_max, λ_min, the Hessian index,
per-layer gradient norms, the gradient noise scale) at steps 0, every, 2·every, … on a
fixed subset of the training set: a `lax.cond` on the window counter inside the one
compiled loop, so recording costs no recompilation (see docs/notes/runner_recording.md).
`train_cfg["l2"]` (or a per-member `l2` array) adds ½·l2·‖θ‖² to the loss the optimizer
sees; the losses reported and measured are the data loss alone.
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
        outputs = apply_fn(params, inputs)
        if loss == "mse" and jnp.issubdtype(targets.dtype, jnp.integer):
            targets = jax.nn.one_hot(targets, outputs.shape[-1])  # regression on one-hot
        elif loss == "mse":
            targets = targets.reshape(outputs.shape)  # float targets: regression
        return fn(outputs, targets)

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
    # (M, R) test loss / accuracy at the end of each record window (NaN once stopped);
    # None when the program was built without a test set.
    test_loss: jax.Array | None = None
    test_accuracy: jax.Array | None = None
    # name -> (M, J): curvature at steps 0, every, 2·every, … (NaN where not recorded:
    # after a member stopped); empty without recording.
    records: dict | None = None


def record_steps(train_cfg: dict, record_cfg: dict | None, num_train: int,
                 batch_size: int) -> list[int]:
    """The steps at which curvature is recorded: 0, every, 2·every, … up to the budget."""
    every = 0 if record_cfg is None else record_cfg["every"]
    if every <= 0:
        return []
    return list(range(0, total_steps(train_cfg, num_train, batch_size) + 1, every))


def make_recorder(loss_fn: Callable, record_cfg: dict, x: jax.Array,
                  y: jax.Array) -> Callable[[Any, jax.Array], dict]:
    """`record(params, key) -> {name: scalar}` for one member on the first
    `record_cfg["num_examples"]` training examples (the same ones at every record).

    Names: `lambda_max`, `lambda_min` (one Lanczos run of `lanczos_steps` for both),
    `index` (fraction of Hessian eigenvalues below −10⁻³·max|λ|, from the spectral
    density: `ls.hessian_index` with `probes` probes of `index_steps` Lanczos steps;
    too few steps smear the mass of near-zero eigenvalues, common in networks, onto
    Ritz values on both sides of the band and inflate the index), `grad_norm/<layer>`
    (`ls.layer_grad_norms` of the full-subset gradient), `noise_scale` (B_simple,
    `ls.gradient_noise_scale`).
    """
    names = set(record_cfg["measures"])
    n = min(record_cfg["num_examples"], x.shape[0])
    sub = (x[:n], y[:n])
    chunk = record_cfg["chunk_size"]
    steps = record_cfg["lanczos_steps"]

    def record(params, key):
        k_eig, k_index = jax.random.split(key)
        out = {}
        hessian = ls.hessian(loss_fn, params, sub, chunk_size=chunk)
        ends = {"lambda_max", "lambda_min"} & names
        if ends:
            which = "both" if len(ends) == 2 else ("top" if "lambda_max" in ends
                                                   else "bottom")
            values = ls.eigenvalues(hessian, k=1, key=k_eig, which=which,
                                    num_steps=max(steps, 2)).values
            if "lambda_max" in names:
                out["lambda_max"] = jnp.max(values)
            if "lambda_min" in names:
                out["lambda_min"] = jnp.min(values)
        if "index" in names:
            out["index"] = ls.hessian_index(hessian, key=k_index, num_probes=record_cfg[
                "probes"], num_steps=record_cfg["index_steps"]).negative
        if "grad_norms" in names:
            norms = ls.layer_grad_norms(loss_fn, params, sub).norms
            out.update({f"grad_norm/{layer}": v for layer, v in norms.items()})
        if "noise_scale" in names:
            out["noise_scale"] = ls.gradient_noise_scale(loss_fn, params, sub,
                                                         chunk_size=chunk).simple
        return {k: v.astype(jnp.float32) for k, v in out.items()}

    return record


def total_steps(train_cfg: dict, num_train: int, batch_size: int) -> int:
    if train_cfg["epochs"] > 0:
        return train_cfg["epochs"] * (num_train // batch_size)
    return train_cfg["steps"]


def make_group_program(model: Model, opt_cfg: dict, train_cfg: dict, batch_size: int,
                       x: jax.Array, y: jax.Array,
                       on_window: Callable[[Any], None] | None = None, *,
                       test: tuple | None = None,
                       record_cfg: dict | None = None) -> Callable:
    """`program(hyper: dict of (M,) arrays, seeds: (M,) ints, l2=None) -> GroupOutput`,
    jitted.

    `on_window(r)` is called on the host after each record window (progress bars).
    `test = (x_test, y_test)` adds the test loss and accuracy per record window;
    `record_cfg` (the config's `[record]` table) turns on curvature records. `l2`, an
    (M,) array, is each member's L2 coefficient; None uses `train_cfg["l2"]` for all.
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
    fixed_l2 = float(train_cfg.get("l2", 0.0))
    rec_every = 0 if record_cfg is None else record_cfg["every"]
    if rec_every % every:
        raise ValueError(f"record every {rec_every} steps must be a multiple of "
                         f"record_every ({every}).")
    recording = rec_every > 0
    per_record = rec_every // every if recording else 0
    num_records = len(record_steps(train_cfg, record_cfg, n, batch_size))
    recorder = make_recorder(loss_fn, record_cfg, x, y) if recording else None

    def penalized(l2):
        """The loss the optimizer descends, and the data loss at the same point."""
        if l2 is None and fixed_l2 == 0:
            return loss_fn, lambda loss, params: loss
        coef = fixed_l2 if l2 is None else l2

        def half_sq(params):
            return 0.5 * coef * optax.tree.norm(params, squared=True)

        return (lambda p, b: loss_fn(p, b) + half_sq(p)), (
            lambda loss, params: loss - half_sq(params))

    def start(hyper, seed):
        # Three streams from the seed: initialization, data order, the optimizer's own
        # randomness (probes, sampled labels).
        k_init, k_data, k_step = jax.random.split(jax.random.key(seed), 3)
        params = model.init(k_init)
        opt_state = build_optimizer(opt_cfg, hyper, steps, layers).init(params)
        # The record stream is folded from the seed so the three above stay unchanged.
        k_record = jax.random.fold_in(jax.random.key(seed), 0x7ec)
        return params, opt_state, jnp.arange(n), jnp.asarray(RUNNING), jnp.stack(
            [k_data, k_step, k_record])

    def window(r, hyper, l2, params, opt_state, perm, status, keys):
        """`every` steps of one member; `r` (the window index) is shared by all members."""
        k_data, k_step = keys[0], keys[1]
        opt = build_optimizer(opt_cfg, hyper, steps, layers)
        objective, data_loss = penalized(l2)

        def step(carry, t):
            params, opt_state, perm, status, total, count = carry
            epoch, pos = t // per_epoch, t % per_epoch
            perm = jax.lax.cond(
                pos == 0, lambda: jax.random.permutation(jax.random.fold_in(k_data, epoch), n),
                lambda: perm)
            idx = jax.lax.dynamic_slice_in_dim(perm, pos * batch_size, batch_size)
            new_params, new_state, loss = tx.train_step(
                opt, objective, params, opt_state, (x[idx], y[idx]),
                jax.random.fold_in(k_step, t), apply_fn=model.apply_fn)
            loss = data_loss(loss, params)
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
        evals = {}
        if test is not None:
            outputs = model.apply_fn(params, test[0])
            # NaN once the member stopped, and in the window it diverged in (its frozen
            # parameters are then from an earlier step than the window's end).
            stopped = jnp.where((count > 0) & (status != DIVERGED), 0.0, jnp.nan)
            evals = {"test_loss": loss_fn(params, test) + stopped,
                     "test_accuracy": ls.accuracy(outputs, test[1]) + stopped}
        return params, opt_state, perm, status, mean, count, evals

    def take_record(records, j, params, status, keys):
        """Fill column j of every record for the members still running."""
        values = jax.vmap(recorder)(params, jax.vmap(
            lambda k: jax.random.fold_in(k[2], j))(keys))
        running = status == RUNNING
        return {name: records[name].at[:, j].set(jnp.where(running, values[name], jnp.nan))
                for name in records}

    @jax.jit
    def group_program(hyper, seeds, l2=None):
        params, opt_state, perm, status, keys = jax.vmap(start)(hyper, seeds)
        m = seeds.shape[0]
        nan = jnp.full((m, records), jnp.nan, jnp.float32)
        evals = {"test_loss": nan, "test_accuracy": nan} if test is not None else {}
        if recording:
            shapes = jax.eval_shape(recorder, jax.tree.map(lambda a: a[0], params),
                                    jax.random.key(0))
            recs = {name: jnp.full((m, num_records), jnp.nan, jnp.float32)
                    for name in shapes}
        else:
            recs = {}
        # One more pass when recording: it records the state after the last window.
        last = records + (1 if recording else 0)

        # The window loop sits outside vmap so its counter stays shared (the epoch
        # permutation's `cond` stays a branch) and the group stops once every member has.
        def going(carry):
            r, _, _, _, status, _, _, _, _ = carry
            return (r < last) & jnp.any(status == RUNNING)

        def train(r, params, opt_state, perm, status, curve, taken, evals):
            if on_window is not None:
                jax.debug.callback(on_window, r)
            params, opt_state, perm, status, mean, count, new = jax.vmap(
                window, in_axes=(None, 0, 0, 0, 0, 0, 0, 0))(
                    r, hyper, l2, params, opt_state, perm, status, keys)
            evals = {k: v.at[:, r].set(new[k]) for k, v in evals.items()}
            return (params, opt_state, perm, status, curve.at[:, r].set(mean), taken + count,
                    evals)

        def body(carry):
            r, params, opt_state, perm, status, curve, taken, evals, recs = carry
            if recording:
                # Records at steps 0, every, 2·every, … taken before window r trains, so
                # a member's record stops once it diverged or converged.
                due = (r % per_record == 0) & (r // per_record < num_records)
                recs = jax.lax.cond(due, take_record, lambda recs, *_: recs,
                                    recs, r // per_record, params, status, keys)
                state = jax.lax.cond(r < records, train,
                                     lambda r, *state: state,
                                     r, params, opt_state, perm, status, curve, taken, evals)
            else:
                state = train(r, params, opt_state, perm, status, curve, taken, evals)
            return (r + 1, *state, recs)

        init = (jnp.asarray(0), params, opt_state, perm, status, nan,
                jnp.zeros((m,), jnp.int32), evals, recs)
        _, params, _, _, status, curve, taken, evals, recs = jax.lax.while_loop(
            going, body, init)
        return GroupOutput(params, status, taken, curve, evals.get("test_loss"),
                           evals.get("test_accuracy"), recs)

    return group_program
