"""Shared helpers for the test suite, generic only; any test file may import them:
`from conftest import EPS, GRAD_TOL, BROKEN_TOL, tiny_config, tiny_model, rand, rand_ids`.

The suite runs on the backend named by MINIMOE_TEST_BACKEND (read once, here):

    python -m pytest -q                                   # numpy (the default)
    MINIMOE_TEST_BACKEND=fake-cupy python -m pytest -q    # tests/fake_cupy.py as `cupy`, all session
    MINIMOE_TEST_BACKEND=cupy python -m pytest -q         # the real CuPy on a CUDA GPU

Tests therefore make their arrays through the backend (`xp()`, `asarray`, `rand`) and compare
through the host (`to_numpy`, `assert_allclose`, `assert_array_equal`), so the same test proves
the same thing on each backend. A test that cannot run on a device backend is marked
`@on_host_only("why")` and skips, with that reason, only there.
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

# ------------------------------------------------------------------------ the session's backend
TEST_BACKENDS = ("numpy", "fake-cupy", "cupy")
# MINIMOE_BACKEND=cupy (the package's own switch) without a test switch means the real CuPy
TEST_BACKEND = os.environ.get("MINIMOE_TEST_BACKEND", "").strip().lower() or (
    "cupy" if backend.get_backend() == "cupy" else "numpy"
)
if TEST_BACKEND not in TEST_BACKENDS:
    raise pytest.UsageError(f"MINIMOE_TEST_BACKEND must be one of {TEST_BACKENDS}, got {TEST_BACKEND!r}")
ON_DEVICE = TEST_BACKEND != "numpy"  # arrays live on a (real or fake) CuPy device
if TEST_BACKEND == "fake-cupy":
    import fake_cupy

    fake_cupy.install()  # sys.modules["cupy"], ... = the fake, for the whole session
if ON_DEVICE:
    backend.set_backend("cupy")


DEVICE = "gpu" if ON_DEVICE else "cpu"  # the train()/CLI `device` that runs on the session's backend
_SESSION = (backend.get_backend(), backend.get_xp(), backend.get_default_dtype())


@pytest.fixture(autouse=True)
def _session_backend():
    """Each test starts on the session's backend and dtype: one that switched them (train(device=
    ...), the CLI's --device, set_backend, a fake installed for one test) cannot leave the next
    test on another one."""
    yield
    name, xp_, dtype = _SESSION
    if backend.get_backend() != name or backend.get_xp() is not xp_:
        backend.set_backend(name)
    backend.set_default_dtype(dtype)


def on_host_only(reason: str):
    """Skip a test under a device test backend only, saying why it cannot run there."""
    return pytest.mark.skipif(
        ON_DEVICE, reason=f"host-only under MINIMOE_TEST_BACKEND={TEST_BACKEND}: {reason}"
    )


def not_on_real_cupy(reason: str):
    """Skip a test on the real CuPy only (the fake computes with numpy, so it runs there)."""
    return pytest.mark.skipif(TEST_BACKEND == "cupy", reason=f"not on the real CuPy: {reason}")


# ------------------------------------------------------------------------ arrays on the backend
def xp():
    """The array module of the session's backend (numpy, or the real or fake cupy)."""
    return backend.get_xp()


def asarray(a, dtype=None):
    """Host data (a list, a numpy array) as an array of the current backend: the explicit copy."""
    return backend.to_device(a, dtype=dtype)


def to_numpy(a):
    """A backend array (or anything numpy takes) on the host, as numpy."""
    return backend.to_numpy(a)


def assert_allclose(actual, desired, **kwargs):
    """np.testing.assert_allclose on host copies of two arrays from any backend."""
    np.testing.assert_allclose(to_numpy(actual), to_numpy(desired), **kwargs)


def assert_array_equal(actual, desired, **kwargs):
    """np.testing.assert_array_equal on host copies of two arrays from any backend."""
    np.testing.assert_array_equal(to_numpy(actual), to_numpy(desired), **kwargs)


def array_equal(a, b) -> bool:
    """np.array_equal on host copies of two arrays from any backend."""
    return bool(np.array_equal(to_numpy(a), to_numpy(b)))


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
    """float64 standard-normal array of the given shape (times scale), drawn on the host by the
    numpy Generator `rng` (the same numbers on every backend) and moved to the backend."""
    return asarray(rng.standard_normal(shape) * scale)


def rand_ids(rng, vocab_size, B=2, T=6):
    """Integer token ids (B, T) in [0, vocab_size), on the host: a model moves its batch itself."""
    return rng.integers(0, vocab_size, (B, T))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def tf_raw():
    """(torch, transformers) as installed, or skip: the comparisons with PyTorch and Hugging Face
    transformers (the `compare` extra) in test_hf.py and test_hf_families.py."""
    torch = pytest.importorskip("torch", reason="parity tests compare against PyTorch (the compare extra)")
    transformers = pytest.importorskip(
        "transformers", reason="parity tests need transformers (compare extra)"
    )
    return torch, transformers


@pytest.fixture
def restore_backend():
    """Put the backend and default dtype back as they were after a test that changes them."""
    name, dtype = backend.get_backend(), backend.get_default_dtype()
    yield
    backend.set_backend(name)
    backend.set_default_dtype(dtype)


def pytest_report_header(config):
    return f"minimoe test backend: {TEST_BACKEND} (MINIMOE_TEST_BACKEND)"


# Under the fake, a test that passed without making one device array proved nothing about the
# device: list such tests at the end, per file, so an unconverted test cannot hide in the pass.
_HOST_ONLY_PASSES: list = []


_MADE_BEFORE = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if TEST_BACKEND == "fake-cupy":
        item.stash[_MADE_BEFORE] = fake_cupy.ndarray.made
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if TEST_BACKEND == "fake-cupy" and call.when == "call" and report.passed:
        if fake_cupy.ndarray.made == item.stash[_MADE_BEFORE]:  # nothing made in its setup or call
            _HOST_ONLY_PASSES.append(item.nodeid)


def pytest_terminal_summary(terminalreporter, config):
    if TEST_BACKEND != "fake-cupy" or not _HOST_ONLY_PASSES:
        return
    per_file: dict = {}
    for nodeid in _HOST_ONLY_PASSES:
        per_file.setdefault(nodeid.split("::")[0], []).append(nodeid.split("::", 1)[1])
    terminalreporter.section("tests that made no device array under the fake cupy (host-side; -v names them)")
    for path, names in sorted(per_file.items()):
        listed = f": {', '.join(names)}" if config.option.verbose > 0 else ""
        terminalreporter.write_line(f"{path}: {len(names)}{listed}")
