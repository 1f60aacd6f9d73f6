"""Numerical tests run in float64 so that comparisons with dense references are tight.

The test programs are small and most of a test's time is XLA compiling them, so the
test run compiles at XLA's backend (code generation) optimization level 0: the default
suite's CPU time fell by about a third. The numbers are checked against independent
references either way. A test that starts its own process sets its own `XLA_FLAGS`.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_enable_x64", True)
