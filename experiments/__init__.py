"""Studies at scale: data, models, jitted sweeps, the results store, reports, the CLI.

    >>> import experiments
    >>> results = experiments.run("sharpness_vs_generalization", overrides=["train.steps=300"])
    >>> results.records()[:2]
"""

from experiments.data import ArrayData
from experiments.run import load, run, validate, write_report
from experiments.schema import ConfigError
from experiments.sweep import Results

__all__ = ["ArrayData", "ConfigError", "Results", "load", "run", "validate", "write_report"]
