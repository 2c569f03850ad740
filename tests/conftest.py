"""Shared fixtures and the hypothesis profiles (CI's is bounded so `make test` stays fast)."""

import os

import numpy as np
import pytest
from hypothesis import settings

import golden

# OpenBLAS sums in a different order at 1 and 2 threads, and the default thread policy follows
# the machine's load: tests that compare two runs bit for bit need a fixed count. The policy's own
# tests set or remove this variable themselves.
os.environ.setdefault("CONVNET_BLAS_THREADS", "1")

settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def golden_conv():
    """The tutorial's conv example: x (3, 5, 5), w (2, 3, 3, 3), b (2,), y (2, 3, 3)."""
    return golden.CONV_X, golden.CONV_W, golden.CONV_B, golden.CONV_Y


@pytest.fixture
def golden_pool():
    """The tutorial's 2x2/2 max pooling example: x (2, 4, 4), y (2, 2, 2)."""
    return golden.POOL_X, golden.MAX_POOL_Y
