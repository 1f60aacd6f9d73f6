"""Local data generation and the NNX-to-pure-function bridge."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.data import mnist1d
from experiments.models import MLP, pure


def test_mnist1d_is_generated_locally_and_restores_global_rng():
    random.seed(7)
    np.random.seed(7)
    before = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    data = mnist1d()
    after = (random.random(), np.random.rand())
    assert before == after  # the generator's global seeding does not leak
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    assert data.num_classes == 10
    np.testing.assert_array_equal(np.bincount(np.concatenate([data.y_train, data.y_test])),
                                  np.full(10, 500))
    again = mnist1d.__wrapped__()
    np.testing.assert_array_equal(again.x_train, data.x_train)  # deterministic


def test_pure_apply_equals_the_module_and_params_are_plain_dicts():
    model = MLP((5, 7, 3), activation="tanh", rngs=nnx.Rngs(0))
    apply_fn, params = pure(model)
    assert isinstance(params, dict)
    x = jax.random.normal(jax.random.key(1), (4, 5))
    np.testing.assert_allclose(apply_fn(params, x), model(x), rtol=1e-6)
    # A manual forward pass with the same arrays agrees too.
    h = jnp.tanh(x @ params["layers"][0]["kernel"] + params["layers"][0]["bias"])
    np.testing.assert_allclose(apply_fn(params, x),
                               h @ params["layers"][1]["kernel"] + params["layers"][1]["bias"],
                               rtol=1e-6)
    grads = jax.jit(jax.grad(lambda p: apply_fn(p, x).sum()))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="activation"):
        MLP((2, 2), activation="swish", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sizes"):
        MLP((2,), rngs=nnx.Rngs(0))


def test_cnn_and_resnet_equal_their_plain_forward_passes():
    from experiments.models import CNN1D, ResNet1D

    x = jax.random.normal(jax.random.key(0), (3, 40))
    conv = lambda z, p, stride=1: jax.lax.conv_general_dilated(  # noqa: E731
        z, p["kernel"], (stride,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")) + p["bias"]
    cnn = CNN1D(10, channels=(4, 6), rngs=nnx.Rngs(1))
    apply_fn, params = pure(cnn)
    h = jax.nn.relu(conv(x[..., None], params["convs"][0]))
    h = jax.nn.relu(conv(h, params["convs"][1], 2))
    ref = h.mean(1) @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(apply_fn(params, x), ref, rtol=1e-5, atol=1e-5)
    for skip in (True, False):
        net = ResNet1D(10, width=4, depth=2, skip=skip, rngs=nnx.Rngs(2))
        apply_fn, params = pure(net)
        h = jax.nn.relu(conv(x[..., None], params["stem"]))
        for block in params["blocks"].values():
            out = conv(jax.nn.relu(conv(h, block[0])), block[1])
            h = jax.nn.relu(out + h if skip else out)
        ref = h.mean(1) @ params["head"]["kernel"] + params["head"]["bias"]
        np.testing.assert_allclose(apply_fn(params, x), ref, rtol=1e-5, atol=1e-5)


def test_teacher_student_is_deterministic_with_every_class_present():
    from experiments.data import teacher_student

    a, b = teacher_student(seed=3), teacher_student(seed=3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (512, 20) and a.num_classes == 4
    assert len(np.unique(a.y_train)) == 4
    with pytest.raises(ValueError):
        teacher_student(num_classes=1)
