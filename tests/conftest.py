"""Numerical tests run in float64 so that comparisons with dense references are tight.

The test programs are small and most of a test's time is XLA compiling them, so the
test run compiles at XLA's backend (code generation) optimization level 0
(`tests.XLA_FLAGS`): the default suite's CPU time fell by about a third. The numbers
are checked against independent references either way. A test that starts its own
process passes the same flags on (`tests.subprocess_env`).
"""

import os

from tests import XLA_FLAGS

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), XLA_FLAGS]).strip()

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_enable_x64", True)
