"""Numerical tests run in float64 so that comparisons with dense references are tight."""

import jax

jax.config.update("jax_enable_x64", True)
