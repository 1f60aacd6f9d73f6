"""Finding the dense layers of a pure function, and running it with layer taps.

`apply_fn(params, inputs)` is traced to a jaxpr with calls (`jit`, `closed_call`)
inlined. A *dense layer* is a `dot_general` whose right operand is a rank-2 parameter
leaf (directly, or through `transpose` / `convert_element_type`) and whose left operand
is an activation contracted on its last axis: `x @ W`, `x @ W.T`, `nnx.Linear`,
`linen.Dense`, `eqx.nn.Linear` under `vmap` all lower to it. Its bias, if any, is a
rank-1 parameter leaf added to the product's output. A kernel used by more than one
`dot_general` (shared weights) is not a dense layer here.

`run_tapped` then re-evaluates the jaxpr equation by equation, recording each dense
layer's input and adding a caller-supplied array to its output (before the bias), so
that differentiating with respect to those arrays gives the cotangents of the
pre-activations. Nothing about the model's library is assumed: only the jaxpr.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

_CALLS = ("jit", "pjit", "closed_call", "core_call")
_PASS = ("convert_element_type", "copy", "copy_p")
_BIAS_SHAPING = ("reshape", "broadcast_in_dim", "convert_element_type", "copy", "copy_p",
                 "expand_dims")


class DenseLayer(NamedTuple):
    """A dense layer found in `apply_fn`: positions in `jax.tree.leaves(params)`."""

    name: str                 # path of the kernel leaf, e.g. "['layers'][0]['kernel']"
    kernel: int               # index of the kernel leaf
    bias: int | None          # index of the bias leaf, if one is added to the output
    transposed: bool          # kernel stored (out, in) rather than (in, out)
    fan_in: int
    fan_out: int


class Graph(NamedTuple):
    jaxpr: Any                # a flat jaxpr of apply_fn on (param leaves + input leaves)
    consts: tuple
    taps: tuple[int, ...]     # equation index of each layer's dot_general
    layers: tuple[DenseLayer, ...]
    out_tree: Any


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _eval(jaxpr, consts, args, tap: Callable | None = None, taps=()):
    """Evaluate `jaxpr`, inlining calls; `tap(k, inputs, out)` may replace the output of
    the k-th equation listed in `taps`."""
    env = {}
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    where = {e: k for k, e in enumerate(taps)}
    for index, eqn in enumerate(jaxpr.eqns):
        invals = [_read(env, v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _CALLS and ("jaxpr" in eqn.params or "call_jaxpr" in eqn.params):
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            sub_jaxpr, sub_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") \
                else (sub, ())
            outs = _eval(sub_jaxpr, sub_consts, invals)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        if tap is not None and index in where:
            outs = [tap(where[index], invals, outs[0])]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [_read(env, v) for v in jaxpr.outvars]


def trace(apply_fn: Callable, params: Any, inputs: Any) -> Graph:
    """Trace `apply_fn(params, inputs)`, inline its calls and find its dense layers."""
    leaves, _ = jax.tree.flatten((params, inputs))
    closed, out_shape = jax.make_jaxpr(apply_fn, return_shape=True)(params, inputs)
    flat = jax.make_jaxpr(lambda *a: _eval(closed.jaxpr, closed.consts, a))(*leaves)
    out_tree = jax.tree.structure(out_shape)
    path_leaves = jax.tree.leaves_with_path(params)
    n_params = len(path_leaves)
    jaxpr = flat.jaxpr

    # origin[var] = (param index, transposed) for values that are a parameter leaf
    origin = {v: (i, False) for i, v in enumerate(jaxpr.invars[:n_params])}
    bias_origin = {v: i for i, v in enumerate(jaxpr.invars[:n_params])
                   if len(v.aval.shape) == 1}
    uses: dict[int, int] = {}
    candidates = []
    for index, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        ins = [v for v in eqn.invars if not isinstance(v, jcore.Literal)]
        if name in _PASS and ins and ins[0] in origin:
            origin[eqn.outvars[0]] = origin[ins[0]]
        if name == "transpose" and ins and ins[0] in origin:
            i, t = origin[ins[0]]
            origin[eqn.outvars[0]] = (i, not t)
        if name in _BIAS_SHAPING and ins and ins[0] in bias_origin:
            bias_origin[eqn.outvars[0]] = bias_origin[ins[0]]
        if name != "dot_general" or len(eqn.invars) != 2:
            continue
        lhs, rhs = eqn.invars
        for v in (lhs, rhs):
            if v in origin:
                uses[origin[v][0]] = uses.get(origin[v][0], 0) + 1
        if rhs not in origin or lhs in origin or isinstance(lhs, jcore.Literal):
            continue
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        i, t = origin[rhs]
        if lb or rb or len(rhs.aval.shape) != 2 or tuple(lc) != (len(lhs.aval.shape) - 1,) \
                or len(rc) != 1:
            continue
        in_dim = rc[0] if not t else 1 - rc[0]
        candidates.append((index, i, in_dim == 1, eqn.outvars[0]))

    taps, layers, claimed = [], [], set()
    for index, i, transposed, out in candidates:
        if uses.get(i, 0) != 1:
            continue
        shape = path_leaves[i][1].shape
        fan_in, fan_out = (shape[1], shape[0]) if transposed else shape
        bias = None
        for eqn in jaxpr.eqns[index + 1:]:
            if eqn.primitive.name != "add" or out not in eqn.invars:
                continue
            other = eqn.invars[1] if eqn.invars[0] is out else eqn.invars[0]
            j = bias_origin.get(other)
            if j is not None and j not in claimed and path_leaves[j][1].shape == (fan_out,):
                bias = j
                claimed.add(j)
            break
        taps.append(index)
        layers.append(DenseLayer(jax.tree_util.keystr(path_leaves[i][0]), i, bias,
                                 transposed, int(fan_in), int(fan_out)))
    return Graph(jaxpr, tuple(flat.consts), tuple(taps), tuple(layers), out_tree)


def run_tapped(graph: Graph, params: Any, inputs: Any, perturbations):
    """`(outputs, layer_inputs)`: apply_fn's outputs with `perturbations[k]` added to the
    k-th dense layer's pre-activation (before its bias), and each layer's input."""
    leaves = jax.tree.leaves((params, inputs))
    recorded = [None] * len(graph.taps)

    def tap(k, invals, out):
        recorded[k] = invals[0]
        return out + perturbations[k].astype(out.dtype)

    outs = _eval(graph.jaxpr, graph.consts, leaves, tap, graph.taps)
    return jax.tree.unflatten(graph.out_tree, outs), tuple(recorded)


def output_shapes(graph: Graph) -> tuple:
    """Shape and dtype of each dense layer's pre-activation."""
    return tuple(graph.jaxpr.eqns[e].outvars[0].aval for e in graph.taps)


def zeros_for(graph: Graph) -> tuple:
    return tuple(jnp.zeros(a.shape, a.dtype) for a in output_shapes(graph))
