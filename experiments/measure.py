"""Measures of trained members: fit, generalization, and the terrain around each minimum.

All members of a group are measured in one jitted program; members run one after
another (`lax.map`), so memory is that of one member's curvature computation.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

import landscape as ls


def make_measure_program(apply_fn: Callable, loss_fn: Callable, measure_cfg: dict,
                         train: tuple, test: tuple) -> Callable:
    """`program(stacked_params, key) -> dict name -> (M,) array`, jitted."""
    names = tuple(measure_cfg["measures"])
    chunk = measure_cfg["chunk_size"]
    sub = jax.tree.map(lambda a: a[: measure_cfg["num_examples"]], train)

    def fit(params, data):
        loss = ls.chunk_mean(lambda b, i: loss_fn(params, b), data, chunk)
        acc = ls.chunk_mean(lambda b, i: ls.accuracy(apply_fn(params, b[0]), b[1]), data,
                            chunk)
        return loss, acc

    def one(args):
        params, key = args
        out = {}
        out["train_loss"], out["train_accuracy"] = fit(params, train)
        out["test_loss"], out["test_accuracy"] = fit(params, test)
        out["gap"] = out["test_loss"] - out["train_loss"]
        out["accuracy_gap"] = out["train_accuracy"] - out["test_accuracy"]
        hessian = ls.hessian(loss_fn, params, sub, chunk_size=chunk)
        if "lambda_max" in names:
            out["lambda_max"] = ls.eigenvalues(
                hessian, k=1, key=key, num_steps=measure_cfg["lanczos_steps"]).values[0]
        if "trace" in names:
            out["trace"] = ls.trace(hessian, key=key,
                                    num_probes=measure_cfg["trace_probes"]).value
        common = dict(key=key, chunk_size=chunk)
        steps = measure_cfg["ascent_steps"]
        if "worst_case" in names:
            out["worst_case"] = ls.sharpness.worst_case(
                loss_fn, params, sub, rho=measure_cfg["rho"], num_steps=steps,
                **common).value
        if "adaptive" in names:
            out["adaptive"] = ls.sharpness.adaptive(
                loss_fn, params, sub, rho=measure_cfg["adaptive_rho"], num_steps=steps,
                **common).value
        if "random" in names:
            out["random"] = ls.sharpness.random(
                loss_fn, params, sub, rho=measure_cfg["rho"],
                num_trials=measure_cfg["random_trials"], **common).mean
        if "keskar" in names:
            out["keskar"] = ls.sharpness.keskar(
                loss_fn, params, sub, epsilon=measure_cfg["keskar_epsilon"],
                num_steps=steps, **common).value
        if "pac_bayes" in names:
            out["pac_bayes"] = ls.sharpness.pac_bayes(
                loss_fn, params, sub, threshold=measure_cfg["pac_bayes_threshold"],
                **common).flatness
        if "noise_scale" in names:
            out["noise_scale"] = ls.gradient_noise_scale(loss_fn, params, sub,
                                                         chunk_size=chunk).simple
        return out

    @jax.jit
    def program(stacked_params, key):
        m = jax.tree.leaves(stacked_params)[0].shape[0]
        return jax.lax.map(one, (stacked_params, jax.random.split(key, m)))

    return program
