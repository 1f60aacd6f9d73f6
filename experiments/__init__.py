"""Studies at scale: data, models, jitted sweeps, the results store, reports, the CLI.

    >>> import experiments
    >>> results = experiments.run("sharpness_vs_generalization", overrides=["train.steps=300"])
    >>> results.records()[:2]
"""

from experiments.config import ConfigError, load
from experiments.sweep import Results, run

__all__ = ["ConfigError", "Results", "load", "run"]
