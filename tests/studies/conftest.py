"""Study tests run in JAX's default float32, as `basin run` does in its own process
(the root conftest turns float64 on for the numerical tests)."""

import jax
import pytest


@pytest.fixture(scope="module", autouse=True)
def float32_like_the_cli():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", previous)
