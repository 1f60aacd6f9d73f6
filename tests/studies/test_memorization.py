"""Memorization (Zhang et al. 2017): λ_max is read at equal training loss from the
records, and on a reduced budget a network fits even fully random labels while its
test accuracy stays at chance and partial noise costs test accuracy."""

import math

import numpy as np
import pytest

import experiments
from experiments.studies import memorization as mem


def test_sharpness_is_read_where_the_loss_first_fell_below_the_level():
    train = [(100, 2.0), (200, 0.5), (300, 0.09), (400, 0.2), (500, 0.01)]
    lam = [(0, 9.0), (200, 7.0), (400, 5.0), (500, 3.0)]
    # No record at step 300 (the first window below 0.1); step 400 went back above
    # it, so the first record below the level is at step 500.
    assert mem.sharpness_at_loss(train, lam, 0.1) == 3.0
    assert mem.sharpness_at_loss(train, lam, 0.6) == 7.0
    assert math.isnan(mem.sharpness_at_loss(train, lam, 0.001))
