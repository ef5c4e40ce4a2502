"""Shared helpers for the test suite, generic only; any test file may import them:
`from conftest import EPS, GRAD_TOL, BROKEN_TOL, tiny_config, tiny_model, rand, rand_ids`.
"""

import os

# The tests use small matrices: one BLAS thread is fastest, and several test processes on a
# shared machine otherwise fight over the cores (10x slower under load). Set before numpy loads;
# an explicit setting in the environment wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minimoe import GPT, Config, backend  # noqa: E402

EPS = 1e-5  # central-difference step of every float64 gradient check
GRAD_TOL = 1e-6  # a correct backward must agree with the numeric gradient to this max rel error
BROKEN_TOL = 1e-3  # a deliberately broken backward must disagree by more than this


def tiny_config(flavour="gpt2", **overrides) -> Config:
    """A model small enough to gradient-check every parameter entry in about a second.

    init_std=0.5 keeps activations and gradients O(1), so round-off stays far below the
    differences a wrong backward makes.
    """
    kw = dict(
        flavour=flavour,
        vocab_size=11,
        block_size=8,
        n_layer=2,
        n_head=4,
        n_embd=8,
        ffn_hidden=12,
        init_std=0.5,
    )
    kw.update(overrides)
    return Config(**kw)


def tiny_model(flavour="gpt2", seed=0, **overrides) -> GPT:
    """A float64 GPT of `tiny_config(flavour, **overrides)`, ready for check_model."""
    return GPT(tiny_config(flavour, **overrides), seed=seed, dtype="float64")


def rand(rng, *shape, scale=1.0):
    """float64 standard-normal array of the given shape (times scale)."""
    return rng.standard_normal(shape) * scale


def rand_ids(rng, vocab_size, B=2, T=6):
    """Integer token ids (B, T) in [0, vocab_size)."""
    return rng.integers(0, vocab_size, (B, T))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def restore_backend():
    """Put the backend and default dtype back as they were after a test that changes them."""
    name, dtype = backend.get_backend(), backend.get_default_dtype()
    yield
    backend.set_backend(name)
    backend.set_default_dtype(dtype)
