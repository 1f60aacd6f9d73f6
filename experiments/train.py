"""The built-in models and optimizers as the group program takes them.

`build_model` turns a `[model]` table into `Model(apply_fn, init)`, `build_optimizer` an
`[optimizer]` table and a member's traced hyper-parameters into a
`GradientTransformation`. The training program itself is `experiments.program`; the
end-of-training and recorded measures are `experiments.measures`.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

import transforms as tx
from experiments.models import CNN1D, MLP, ResNet1D, Transformer1D, pure
from experiments.program import CONVERGED, DIVERGED, RUNNING, Model, loss_function

__all__ = ["CONVERGED", "DIVERGED", "RUNNING", "Model", "build_model", "build_optimizer",
           "loss_function"]


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
