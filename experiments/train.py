"""The built-in models and optimizers as the group program takes them.

`build_model` turns a `[model]` table into `Model(apply_fn, init)`, `build_optimizer` an
`[optimizer]` table and a member's traced hyper-parameters into a
`GradientTransformation`. The training program itself is `experiments.program`; the
end-of-training and recorded measures are `experiments.measures`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import transforms as tx
from experiments.build import Model, builtin
from experiments.program import CONVERGED, DIVERGED, RUNNING, loss_function

__all__ = ["CONVERGED", "DIVERGED", "RUNNING", "Model", "build_model", "build_optimizer",
           "loss_function"]


def build_model(model_cfg: dict, num_features: int, num_classes: int) -> Model:
    """The config's built-in model as pure `apply_fn(params, x)` and `init(key) -> params`
    (`experiments.build.builtin` on a flat input of `num_features`)."""
    return builtin(model_cfg, jnp.zeros((1, num_features)), num_classes)


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
