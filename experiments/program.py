"""One group of a sweep as one jitted program: `lax.scan` over steps, `vmap` over members.

Members of a group share shapes (batch size, model, optimizer) and differ in vmapped
values (learning rate, seed, numeric optimizer hyper-parameters, L2). Mini-batches are
gathered on device from a permutation drawn at each epoch boundary (exact epochs; the
last partial batch of each epoch is dropped). A member whose loss or parameters become
non-finite, or whose mini-batch loss exceeds `diverge_above`, is marked diverged and
frozen; one that reaches `until_train_loss` (mean mini-batch loss over a record window)
is marked converged and frozen; the others go on.

The program is a `while_loop` over record windows of `record_every` steps, outside the
member `vmap` so the window counter (and the step the optimizer sees) stays shared: the
epoch permutation's `cond` and any optimizer's refresh branch stay branches. Each
window ends with every member's test loss and accuracy (early stopping's record). With recording on, curvature (see
`experiments.measures.RECORDED`) is measured at steps 0, every, 2·every, … on a fixed
subset of the training set: a `lax.cond` on the window counter inside the one compiled
loop, so recording costs no recompilation (docs/guides/recording.md). `l2` adds
½·l2·‖θ‖² to the loss the optimizer sees; the losses reported are the data loss alone.

Each seed gives three streams, `k_init, k_data, k_step = split(key(seed), 3)`
(initialization, data order, the optimizer's own randomness), and the record stream
`fold_in(key(seed), 0x7ec)`, so turning recording on changes no training number.

`on_window(windows_done, running)` runs on the host after every window (through
`io_callback`): progress, and the way an interrupt reaches the program. It returns True
to stop the group after that window.

Example:
  >>> program = make_group_program(model, lambda h: optax.sgd(h["learning_rate"]),
  ...                              Settings(steps=1000, batch_size=128, record_every=100), x, y)
  >>> program({"learning_rate": jnp.array([0.1, 0.3])}, jnp.array([0, 0])).curve.shape
  (2, 10)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import io_callback
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import landscape as ls
import transforms as tx
from experiments.build import Model
from experiments.loop import step_kwargs
from experiments.measures import make_recorder

RUNNING, DIVERGED, CONVERGED = 0, 1, 2


@dataclass(frozen=True)
class Settings:
    """What the group program needs to know besides the model, optimizer and data.

    `loss` is "cross_entropy", "mse" (on one-hot targets) or a function
    `loss_fn(params, batch) -> scalar`; `record` is the `[record]` table (an object with
    `experiments.measures.RecordSettings`' attributes) or None for no curvature records.
    """

    steps: int
    batch_size: int
    record_every: int
    until_train_loss: float = 0.0
    diverge_above: float = math.inf
    loss: str | Callable = "cross_entropy"
    l2: float = 0.0
    record: Any = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "record_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (self.loss in ("cross_entropy", "mse") or callable(self.loss)):
            raise ValueError(f"loss must be 'cross_entropy', 'mse' or a function, got "
                             f"{self.loss!r}")
        every = self.record_every_steps
        if every % self.record_every:
            raise ValueError(f"record every {every} steps must be a multiple of "
                             f"record_every ({self.record_every}).")

    @property
    def record_every_steps(self) -> int:
        return 0 if self.record is None else self.record.every

    @property
    def windows(self) -> int:
        return math.ceil(self.steps / self.record_every)

    def record_steps(self) -> list[int]:
        """The steps at which curvature is recorded: 0, every, 2·every, … up to `steps`."""
        every = self.record_every_steps
        return list(range(0, self.steps + 1, every)) if every > 0 else []


class GroupOutput(NamedTuple):
    """What a group program returns; per-window and per-record values are NaN once a
    member stopped (test values are None without a test set, records empty without
    recording)."""

    params: Any  # stacked over members
    status: jax.Array  # (M,) int
    steps: jax.Array  # (M,) steps taken
    curve: jax.Array  # (M, R) mean mini-batch loss per record window
    test_loss: jax.Array | None = None      # (M, R) at each window's end
    test_accuracy: jax.Array | None = None  # (M, R)
    records: dict | None = None  # name -> (M, J) at steps 0, every, 2·every, …


@dataclass(frozen=True, eq=False)
class Problem:
    """Everything static the pieces of the program read (closed over by `jit`; not a
    pytree, so it never becomes a traced argument)."""

    model: Model
    make_optimizer: Callable[[dict], optax.GradientTransformation]
    settings: Settings
    loss_fn: Callable
    x: jax.Array
    y: jax.Array
    test: tuple | None
    recorder: Callable | None
    on_window: Callable | None


class MemberState(NamedTuple):
    """One member's training state (stacked over members outside `vmap`)."""

    params: Any
    opt_state: Any
    perm: jax.Array     # this epoch's order of the training examples
    status: jax.Array   # RUNNING, DIVERGED or CONVERGED
    keys: jax.Array     # (3,) keys: data order, optimizer, records


class StepCarry(NamedTuple):
    state: MemberState
    total: jax.Array    # sum of the window's mini-batch losses
    count: jax.Array    # steps taken in the window


class Window(NamedTuple):
    state: MemberState
    mean: jax.Array     # mean mini-batch loss over the window (NaN: no step taken)
    count: jax.Array
    evals: dict         # test_loss, test_accuracy at the window's end


class LoopCarry(NamedTuple):
    r: jax.Array        # the window index, shared by all members
    state: MemberState
    curve: jax.Array    # (M, R)
    taken: jax.Array    # (M,) steps taken
    evals: dict         # name -> (M, R)
    records: dict       # name -> (M, J)
    stop: jax.Array     # the host asked the program to stop


def loss_function(apply_fn: Callable, loss: str) -> Callable:
    """`loss_fn(params, (inputs, targets))` of a named loss. For "mse", integer targets
    become one-hot over the model's output width and float targets are regressed on as
    they are (reshaped to the outputs)."""
    fn = {"cross_entropy": ls.cross_entropy, "mse": ls.mse}[loss]

    def loss_fn(params, batch):
        inputs, targets = batch
        outputs = apply_fn(params, inputs)
        if loss == "mse" and jnp.issubdtype(targets.dtype, jnp.integer):
            targets = jax.nn.one_hot(targets, outputs.shape[-1])
        elif loss == "mse":
            targets = targets.reshape(outputs.shape)
        return fn(outputs, targets)

    return loss_fn


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


def _half_sq(coef, params):
    return 0.5 * coef * optax.tree.norm(params, squared=True)


def _penalized_loss(loss_fn, coef, params, batch):
    return loss_fn(params, batch) + _half_sq(coef, params)


def _data_loss(coef, loss, params):
    return loss if coef is None else loss - _half_sq(coef, params)


def _objectives(p: Problem, l2) -> tuple[Callable, Callable]:
    """The loss the optimizer descends, and the map from it to the data loss."""
    if l2 is None and p.settings.l2 == 0:
        return p.loss_fn, functools.partial(_data_loss, None)
    coef = float(p.settings.l2) if l2 is None else l2
    return (functools.partial(_penalized_loss, p.loss_fn, coef),
            functools.partial(_data_loss, coef))


def _start(p: Problem, hyper: dict, seed: jax.Array) -> MemberState:
    k_init, k_data, k_step = jax.random.split(jax.random.key(seed), 3)
    params = p.model.init(k_init)
    opt_state = p.make_optimizer(hyper).init(params)
    # The record stream is folded from the seed so the three above stay unchanged.
    k_record = jax.random.fold_in(jax.random.key(seed), 0x7ec)
    return MemberState(params, opt_state, jnp.arange(p.x.shape[0]), jnp.asarray(RUNNING),
                       jnp.stack([k_data, k_step, k_record]))


def _step(p: Problem, opt, objective, data_loss, carry: StepCarry, t):
    """One optimizer step of one member; `t` is the global step (unbatched)."""
    s, n, batch = p.settings, p.x.shape[0], p.settings.batch_size
    per_epoch = n // batch
    state = carry.state
    k_data, k_step = state.keys[0], state.keys[1]
    epoch, pos = t // per_epoch, t % per_epoch
    perm = jax.lax.cond(
        pos == 0, lambda: jax.random.permutation(jax.random.fold_in(k_data, epoch), n),
        lambda: state.perm)
    idx = jax.lax.dynamic_slice_in_dim(perm, pos * batch, batch)
    # `t` is unbatched (the window counter is shared), so a refreshing optimizer's
    # branch on it stays one branch for the whole group.
    new_params, new_opt, loss = tx.train_step(
        opt, objective, state.params, state.opt_state, (p.x[idx], p.y[idx]),
        jax.random.fold_in(k_step, t), apply_fn=p.model.apply_fn, **step_kwargs(t))
    loss = data_loss(loss, state.params)
    active = (state.status == RUNNING) & (t < s.steps)
    finite = jnp.isfinite(loss) & (loss <= s.diverge_above) & _all_finite(new_params)
    status = jnp.where(active & ~finite, DIVERGED, state.status)
    keep = active & finite
    params = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new_params, state.params)
    opt_state = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new_opt, state.opt_state)
    state = MemberState(params, opt_state, perm, status, state.keys)
    total = carry.total + jnp.where(keep, loss, 0.0).astype(carry.total.dtype)
    return StepCarry(state, total, carry.count + keep), None


def _evaluate(p: Problem, params, status, count) -> dict:
    if p.test is None:
        return {}
    outputs = p.model.apply_fn(params, p.test[0])
    # NaN once the member stopped, and in the window it diverged in (its frozen
    # parameters are then from an earlier step than the window's end).
    stopped = jnp.where((count > 0) & (status != DIVERGED), 0.0, jnp.nan)
    return {"test_loss": p.loss_fn(params, p.test) + stopped,
            "test_accuracy": ls.accuracy(outputs, p.test[1]) + stopped}


def _window(p: Problem, r, hyper: dict, l2, state: MemberState) -> Window:
    """`record_every` steps of one member from window `r`."""
    every = p.settings.record_every
    objective, data_loss = _objectives(p, l2)
    step = functools.partial(_step, p, p.make_optimizer(hyper), objective, data_loss)
    # The window's loss sum in the parameters' precision (float64 models stay float64).
    dtype = jnp.result_type(jnp.float32, *[a.dtype for a in jax.tree.leaves(state.params)
                                           if jnp.issubdtype(a.dtype, jnp.floating)])
    zero = StepCarry(state, jnp.zeros((), dtype), jnp.zeros((), jnp.int32))
    carry, _ = jax.lax.scan(step, zero, r * every + jnp.arange(every))
    state, count = carry.state, carry.count
    mean = jnp.where(count > 0, carry.total / jnp.maximum(count, 1), jnp.nan)
    target = float(p.settings.until_train_loss)
    if target > 0:
        state = state._replace(status=jnp.where(
            (state.status == RUNNING) & (mean < target), CONVERGED, state.status))
    return Window(state, mean, count, _evaluate(p, state.params, state.status, count))


def _take_record(p: Problem, hyper: dict, records: dict, j, state: MemberState) -> dict:
    """Fill column j of every record for the members still running."""
    keys = jax.vmap(lambda k: jax.random.fold_in(k[2], j))(state.keys)
    values = jax.vmap(p.recorder)(state.params, keys, state.opt_state, hyper)
    running = state.status == RUNNING
    return {name: records[name].at[:, j].set(jnp.where(running, values[name], jnp.nan))
            for name in records}


def _train(p: Problem, hyper: dict, l2, c: LoopCarry) -> LoopCarry:
    """Window `c.r` of every member (vmapped), written into the carry."""
    w = jax.vmap(functools.partial(_window, p), in_axes=(None, 0, 0, 0))(
        c.r, hyper, l2, c.state)
    # Curves are stored in float32 whatever the model's precision.
    evals = {k: v.at[:, c.r].set(w.evals[k].astype(v.dtype)) for k, v in c.evals.items()}
    return c._replace(state=w.state, curve=c.curve.at[:, c.r].set(w.mean.astype(c.curve.dtype)),
                      taken=c.taken + w.count, evals=evals)


def _poll(p: Problem, c: LoopCarry) -> jax.Array:
    """Ask the host whether to stop; `running` makes the call wait for the window."""
    windows = jnp.minimum(c.r + 1, p.settings.windows)
    running = jnp.sum(c.state.status == RUNNING)
    return io_callback(lambda r, n: np.bool_(bool(p.on_window(int(r), int(n)))),
                       jax.ShapeDtypeStruct((), jnp.bool_), windows, running)


def _body(p: Problem, hyper: dict, l2, c: LoopCarry) -> LoopCarry:
    windows, record = p.settings.windows, p.recorder is not None
    if record:
        # Records at steps 0, every, 2·every, … taken before window r trains, so a
        # member's record stops once it diverged or converged.
        per_record = p.settings.record_every_steps // p.settings.record_every
        num_records = len(p.settings.record_steps())
        due = (c.r % per_record == 0) & (c.r // per_record < num_records)
        records = jax.lax.cond(due, functools.partial(_take_record, p, hyper),
                               lambda recs, *_: recs, c.records, c.r // per_record, c.state)
        c = c._replace(records=records)
        c = jax.lax.cond(c.r < windows, functools.partial(_train, p, hyper, l2),
                         lambda c: c, c)
    else:
        c = _train(p, hyper, l2, c)
    if p.on_window is not None:
        c = c._replace(stop=_poll(p, c))
    return c._replace(r=c.r + 1)


def _going(p: Problem, c: LoopCarry) -> jax.Array:
    # One more pass when recording: it records the state after the last window.
    last = p.settings.windows + (1 if p.recorder is not None else 0)
    return (c.r < last) & jnp.any(c.state.status == RUNNING) & ~c.stop


def _initial(p: Problem, hyper: dict, state: MemberState) -> LoopCarry:
    m = state.status.shape[0]
    nan = jnp.full((m, p.settings.windows), jnp.nan, jnp.float32)
    evals = {"test_loss": nan, "test_accuracy": nan} if p.test is not None else {}
    records = {}
    if p.recorder is not None:
        first = jax.tree.map(lambda a: a[0], (state.params, state.opt_state, hyper))
        shapes = jax.eval_shape(p.recorder, first[0], jax.random.key(0), first[1], first[2])
        num_records = len(p.settings.record_steps())
        records = {name: jnp.full((m, num_records), jnp.nan, jnp.float32)
                   for name in shapes}
    return LoopCarry(jnp.asarray(0), state, nan, jnp.zeros((m,), jnp.int32), evals,
                     records, jnp.asarray(False))


def group_program(p: Problem, hyper: dict, seeds: jax.Array, l2=None) -> GroupOutput:
    """The group: start every member, run the window loop, collect the outputs."""
    state = jax.vmap(functools.partial(_start, p))(hyper, seeds)
    c = jax.lax.while_loop(functools.partial(_going, p),
                           functools.partial(_body, p, hyper, l2), _initial(p, hyper, state))
    return GroupOutput(c.state.params, c.state.status, c.taken, c.curve,
                       c.evals.get("test_loss"), c.evals.get("test_accuracy"), c.records)


def make_group_program(model: Model, make_optimizer: Callable[[dict], Any],
                       settings: Settings, x: jax.Array, y: jax.Array, *,
                       test: tuple | None = None,
                       on_window: Callable[[int, int], bool] | None = None,
                       optimizer: dict | None = None) -> Callable:
    """`program(hyper: dict of (M,) arrays, seeds: (M,) ints, l2=None) -> GroupOutput`,
    jitted.

    `make_optimizer(hyper)` builds one member's optimizer from its (traced)
    hyper-parameters; `test = (x_test, y_test)` adds the test loss and accuracy per
    record window; `l2`, an (M,) array, is each member's L2 coefficient (None:
    `settings.l2` for all); `on_window(windows_done, members_running) -> stop` runs on
    the host after each window; `optimizer`, the keyword arguments every member's
    optimizer is built with besides `hyper`, is what recorded measures that read the
    optimizer state (`preconditioned_lambda_max`) take its hyper-parameters from.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and "
                         f"{y.shape[0]}")
    if settings.batch_size > x.shape[0]:
        raise ValueError(f"batch_size ({settings.batch_size}) is larger than the "
                         f"training set ({x.shape[0]} examples)")
    loss_fn = (settings.loss if callable(settings.loss)
               else loss_function(model.apply_fn, settings.loss))
    recorder = (make_recorder(loss_fn, settings.record, x, y, optimizer)
                if settings.record_every_steps > 0 else None)
    problem = Problem(model, make_optimizer, settings, loss_fn, x, y, test, recorder,
                      on_window)
    return jax.jit(functools.partial(group_program, problem))


def member_mesh() -> Mesh | None:
    """A one-axis mesh ("members") over every local device; None on one device."""
    devices = jax.local_devices()
    return Mesh(np.array(devices), ("members",)) if len(devices) > 1 else None


def padded_size(m: int, mesh: Mesh | None) -> int:
    """Members after padding to a multiple of the device count (copies of the last)."""
    return m if mesh is None else m + (-m % mesh.size)


def shard_members(tree: Any, mesh: Mesh | None) -> Any:
    """Place the leading (member) axis of every leaf across the mesh."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec("members")))
