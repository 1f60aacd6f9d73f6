"""Studies at scale: data, models, jitted sweeps, the results store, reports, the CLI.

    >>> import experiments
    >>> results = experiments.run("sharpness_vs_generalization", overrides=["train.steps=300"])
    >>> results.records()[:2]
"""

# One BLAS thread per process, set before numpy, scipy or jax load OpenBLAS (which reads
# it once, at load): jaxlib's CPU `eigh`/`qr`/`cholesky` call scipy's OpenBLAS, whose
# own threads beside XLA's oversubscribe a small CPU; a 256 × 256 `eigh` took 148 ms
# (median 1.2 s under load) instead of 27 ms, and a one-member `basin run` of Shampoo
# spent most of its time there. Setting it in `cli.py` came too late: importing
# `experiments.cli` runs this file, and its imports, first.
import os as _os

_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from experiments.data import ArrayData
from experiments.run import load, run, validate, write_report
from experiments.schema import ConfigError
from experiments.sweep import Results

__all__ = ["ArrayData", "ConfigError", "Results", "load", "run", "validate", "write_report"]
