"""Finding the dense and convolution layers of a pure function, and running it with taps.

`apply_fn(params, inputs)` is traced to a jaxpr with calls (`jit`, `closed_call`)
inlined. A *dense layer* is a `dot_general` whose right operand is a rank-2 parameter
leaf (directly, or through `transpose` / `convert_element_type`) and whose left operand
is an activation contracted on its last axis: `x @ W`, `x @ W.T`, `nnx.Linear`,
`linen.Dense`, `eqx.nn.Linear` under `vmap` all lower to it. A *convolution layer* is a
`conv_general_dilated` (any layout, stride, padding, dilation; no feature or batch
groups) of an activation with a parameter leaf as its kernel: `nnx.Conv`, `linen.Conv`,
`lax.conv_general_dilated`. Its bias, if any, is a rank-1 parameter leaf added to the
output. A kernel used by more than one `dot_general` / convolution (shared weights) is
not a layer here.

A convolution is a dense layer applied at every output position to the input patch
under the kernel (Grosse & Martens 2016, KFC): `layer_rows` turns its recorded input
into patches (`lax.conv_general_dilated_patches`, one row per example and position,
features in (input channel, kernel offset) order) and `kernel_matrix` its kernel into
the matching (patch size, output channels) matrix.

`run_tapped` then re-evaluates the jaxpr equation by equation, recording each dense
layer's input and adding a caller-supplied array to its output (before the bias), so
that differentiating with respect to those arrays gives the cotangents of the
pre-activations. Nothing about the model's library is assumed: only the jaxpr.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

_CALLS = ("jit", "pjit", "closed_call", "core_call")
_PASS = ("convert_element_type", "copy", "copy_p")
_BIAS_SHAPING = ("reshape", "broadcast_in_dim", "convert_element_type", "copy", "copy_p",
                 "expand_dims")


class DenseLayer(NamedTuple):
    """A dense or convolution layer found in `apply_fn`: positions in
    `jax.tree.leaves(params)`. For a convolution, `kernel_axes` orders the kernel's
    axes as (input channel, spatial..., output channel), fan_in = channels × kernel
    size; it is None for a dense layer."""

    name: str                 # path of the kernel leaf, e.g. "['layers'][0]['kernel']"
    kernel: int               # index of the kernel leaf
    bias: int | None          # index of the bias leaf, if one is added to the output
    transposed: bool          # kernel stored (out, in) rather than (in, out)
    fan_in: int
    fan_out: int
    kernel_axes: tuple[int, ...] | None = None


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


def _dense_candidate(eqn, leaf: int, transposed: bool):
    """(transposed, None) for `activation @ kernel`, else None."""
    del leaf
    lhs, rhs = eqn.invars
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or len(rhs.aval.shape) != 2 or tuple(lc) != (len(lhs.aval.shape) - 1,) \
            or len(rc) != 1:
        return None
    in_dim = rc[0] if not transposed else 1 - rc[0]
    return in_dim == 1, None


def _conv_candidate(eqn, leaf: int, transposed: bool):
    """(False, kernel_axes) for a plain convolution with a parameter kernel, else None."""
    del leaf
    p = eqn.params
    if transposed or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    rhs_spec = p["dimension_numbers"].rhs_spec
    return False, (rhs_spec[1], *rhs_spec[2:], rhs_spec[0])


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
        if name not in ("dot_general", "conv_general_dilated") or len(eqn.invars) != 2:
            continue
        lhs, rhs = eqn.invars
        for v in (lhs, rhs):
            if v in origin:
                uses[origin[v][0]] = uses.get(origin[v][0], 0) + 1
        if rhs not in origin or lhs in origin or isinstance(lhs, jcore.Literal):
            continue
        found = (_dense_candidate if name == "dot_general" else _conv_candidate)(
            eqn, *origin[rhs])
        if found is not None:
            candidates.append((index, origin[rhs][0], found, eqn.outvars[0]))

    taps, layers, claimed = [], [], set()
    for index, i, (transposed, axes), out in candidates:
        if uses.get(i, 0) != 1:
            continue
        shape = path_leaves[i][1].shape
        if axes is not None:
            fan_out = shape[axes[-1]]
            fan_in = int(np.prod(shape)) // fan_out
        else:
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
                                 transposed, int(fan_in), int(fan_out), axes))
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


def layer_rows(graph: Graph, k: int, recorded: jax.Array) -> jax.Array:
    """The k-th layer's input as rows (examples × positions, fan_in): the activation
    itself for a dense layer, its patches for a convolution."""
    eqn = graph.jaxpr.eqns[graph.taps[k]]
    if eqn.primitive.name != "conv_general_dilated":
        return recorded.reshape(-1, recorded.shape[-1])
    p, kernel = eqn.params, eqn.invars[1].aval
    dn = p["dimension_numbers"]
    patches = jax.lax.conv_general_dilated_patches(
        recorded, tuple(kernel.shape[i] for i in dn.rhs_spec[2:]), p["window_strides"],
        p["padding"], p["lhs_dilation"], p["rhs_dilation"], dn, p["precision"])
    patches = jnp.moveaxis(patches, dn.out_spec[1], -1)
    return patches.reshape(-1, patches.shape[-1])


def output_rows(graph: Graph, k: int, out: jax.Array) -> jax.Array:
    """An array shaped like the k-th layer's pre-activation (optionally with leading
    axes) as rows (..., positions, fan_out), output features last."""
    eqn = graph.jaxpr.eqns[graph.taps[k]]
    if eqn.primitive.name == "conv_general_dilated":
        lead = out.ndim - len(eqn.outvars[0].aval.shape)
        out = jnp.moveaxis(out, lead + eqn.params["dimension_numbers"].out_spec[1], -1)
    return out.reshape(-1, out.shape[-1])


def kernel_matrix(layer: DenseLayer, kernel: jax.Array) -> jax.Array:
    """The layer's kernel as an (fan_in, fan_out) matrix (rows matching `layer_rows`)."""
    if layer.kernel_axes is not None:
        return jnp.transpose(kernel, layer.kernel_axes).reshape(layer.fan_in, layer.fan_out)
    return kernel.T if layer.transposed else kernel


def kernel_from_matrix(layer: DenseLayer, matrix: jax.Array, shape: tuple) -> jax.Array:
    """The inverse of `kernel_matrix`: a (fan_in, fan_out) matrix in the kernel's shape."""
    if layer.kernel_axes is not None:
        axes = layer.kernel_axes
        permuted = matrix.reshape(tuple(shape[a] for a in axes))
        return jnp.transpose(permuted, np.argsort(axes))
    return matrix.T if layer.transposed else matrix


def output_shapes(graph: Graph) -> tuple:
    """Shape and dtype of each dense layer's pre-activation."""
    return tuple(graph.jaxpr.eqns[e].outvars[0].aval for e in graph.taps)


def zeros_for(graph: Graph) -> tuple:
    return tuple(jnp.zeros(a.shape, a.dtype) for a in output_shapes(graph))
