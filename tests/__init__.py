"""Basin's tests. `XLA_FLAGS` are the flags the whole test run compiles with (set by
conftest.py before jax loads); a test that starts its own process passes them on with
`subprocess_env`, so that both sides compile alike and can be compared bit for bit."""

import os

XLA_FLAGS = "--xla_backend_optimization_level=0"


def subprocess_env(*flags: str) -> dict:
    """`os.environ` with XLA_FLAGS replaced by the test run's flags and `flags`."""
    return dict(os.environ, XLA_FLAGS=" ".join([XLA_FLAGS, *flags]))
