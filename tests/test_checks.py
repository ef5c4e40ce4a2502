"""The lesson check helpers (minimoe.lessons.checks): every failure is one CheckFailed line that
names the function and the case and gives the numbers; correct answers pass."""

import os

import numpy as np
import pytest

from minimoe.lessons import checks
from minimoe.lessons.checks import CheckFailed, case, check_close, check_gradient, check_shape, reference

FN, CASE = "softmax_topk_backward", "k=2 renormalize=True"
PREFIX = f"{FN}, case {CASE}: "


def failure(f, *args, **kwargs) -> str:
    with pytest.raises(CheckFailed) as info:
        f(*args, **kwargs)
    msg = str(info.value)
    assert msg.startswith(PREFIX), msg
    assert "\n" not in msg, "the message must be one line"
    return msg


# ---------------------------------------------------------------------------------------------
# case
# ---------------------------------------------------------------------------------------------


def _run_in_case(exc):
    with case(FN, CASE):
        raise exc


def test_case_turns_a_numpy_error_into_a_named_failure():
    def broadcast():
        with case(FN, CASE):
            np.zeros((3, 2)) + np.zeros((4, 2))

    msg = failure(broadcast)
    assert "raised ValueError: operands could not be broadcast together" in msg
    with pytest.raises(CheckFailed) as info:
        broadcast()
    assert isinstance(info.value.__cause__, ValueError)  # the learner's traceback stays attached


def test_case_says_not_written_yet_for_a_stub():
    msg = failure(_run_in_case, NotImplementedError("Lesson 05: your code here"))
    assert msg == PREFIX + "not written yet (NotImplementedError: Lesson 05: your code here)"


def test_case_keeps_only_the_first_line_and_handles_empty_messages():
    assert failure(_run_in_case, TypeError("bad\nsecond line")) == PREFIX + "raised TypeError: bad"
    assert failure(_run_in_case, IndexError()) == PREFIX + "raised IndexError"
    assert failure(_run_in_case, AssertionError("x")) == PREFIX + "raised AssertionError: x"


def test_case_passes_check_failures_through_unchanged_and_is_silent_on_success():
    inner = CheckFailed("other_fn, case c: something")
    with pytest.raises(CheckFailed) as info:
        _run_in_case(inner)
    assert info.value is inner
    with case(FN, CASE):
        x = 1 + 1
    assert x == 2


# ---------------------------------------------------------------------------------------------
# check_shape
# ---------------------------------------------------------------------------------------------


def test_check_shape_names_the_array_and_both_shapes():
    check_shape(FN, CASE, "dlogits", np.zeros((7, 5)), (7, 5), "f")
    msg = failure(check_shape, FN, CASE, "dlogits", np.zeros((7, 6)), (7, 5))
    assert msg == PREFIX + "dlogits has shape (7, 6), expected (7, 5)"


def test_check_shape_dtype_and_non_arrays():
    msg = failure(check_shape, FN, CASE, "idx", np.zeros((7, 2)), (7, 2), "iu")
    assert msg == PREFIX + "idx has dtype float64, expected an integer or unsigned integer dtype"
    check_shape(FN, CASE, "idx", np.zeros((7, 2), dtype=np.int64), (7, 2), "iu")
    msg = failure(check_shape, FN, CASE, "gates", [[0.5, 0.5]], (1, 2))
    assert msg == PREFIX + "gates is a list of length 1, expected an array of shape (1, 2)"
    assert "gates is None" in failure(check_shape, FN, CASE, "gates", None, (1, 2))
    check_shape(FN, CASE, "loss", 1.5, (), "f")  # a Python float is a 0-d value
    assert "loss has shape (), expected (1,)" in failure(check_shape, FN, CASE, "loss", 1.5, (1,))


# ---------------------------------------------------------------------------------------------
# check_close
# ---------------------------------------------------------------------------------------------


def test_check_close_passes_within_tolerance_and_reports_the_relative_error():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 3))
    check_close(FN, CASE, "dlogits", a + 1e-14, a, 1e-10)
    b = a.copy()
    b[2, 1] += 0.5
    msg = failure(check_close, FN, CASE, "dlogits", b, a, 1e-10)
    err = 0.5 / np.abs(b).max()
    assert f"dlogits differs from the reference: rel error {err:.1e}, expected < 1e-10" in msg
    assert "worst at (2, 1)" in msg


def test_check_close_checks_the_shape_before_comparing():
    msg = failure(check_close, FN, CASE, "x_sorted", np.zeros((5, 3)), np.zeros((4, 3)), 1e-12)
    assert msg == PREFIX + "x_sorted has shape (5, 3), expected (4, 3)"


def test_check_close_exact_for_integers_and_rtol_zero():
    exp = np.array([[0, 1], [2, 3]])
    check_close(FN, CASE, "idx", exp.copy(), exp, 0)
    got = np.array([[0, 1], [3, 2]])
    msg = failure(check_close, FN, CASE, "idx", got, exp, 0)
    assert (
        msg
        == PREFIX + "idx differs from the reference at 2 of 4 entries (first at (1, 0): got 3, expected 2)"
    )
    assert (
        failure(check_close, FN, CASE, "M", np.asarray(21), np.asarray(19), 0)
        == PREFIX + "M is 21, expected 19"
    )
    mask = np.tril(np.ones((2, 3), bool))
    wrong = mask.copy()
    wrong[0, 1] = True  # one key too many
    msg = failure(check_close, FN, CASE, "mask", wrong, mask, 0)
    assert msg.endswith(
        "mask differs from the reference at 1 of 6 entries (first at (0, 1): got True, expected False)"
    )


def test_check_close_absolute_tolerance_for_zero_values():
    check_close(FN, CASE, "I", 3e-17, np.asarray(0.0), 1e-12, atol=1e-12)
    msg = failure(check_close, FN, CASE, "I", 0.25, np.asarray(0.0), 1e-12, atol=1e-12)
    assert (
        msg
        == PREFIX
        + "I differs from the reference: rel error 1.0e+00, expected < 1e-12 or abs error <= 1e-12 (got 0.25, expected 0)"
    )


def test_check_close_reports_nan_and_scalars():
    msg = failure(check_close, FN, CASE, "loss", np.array([np.nan, 1.0]), np.array([1.0, 1.0]), 1e-9)
    assert msg == PREFIX + "loss has 1 non-finite entries (nan or inf) of 2"
    check_close(FN, CASE, "loss", 2.0, np.array(2.0), 1e-12)
    assert "rel error 5.0e-01" in failure(check_close, FN, CASE, "loss", 1.0, np.array(2.0), 1e-12)


# ---------------------------------------------------------------------------------------------
# check_gradient
# ---------------------------------------------------------------------------------------------


def _quadratic(w):
    """f(x) = sum(w * x^2) / 2 (a scalar), analytic gradient w * x."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4))
    return x, (lambda: float((w * x * x).sum() / 2)), w * x


def test_check_gradient_passes_a_correct_gradient_and_restores_x():
    w = np.linspace(0.5, 2.0, 12).reshape(3, 4)
    x, f, grad = _quadratic(w)
    before = x.copy()
    check_gradient(FN, CASE, f, x, grad, 1e-7, name="dlogits")
    assert np.array_equal(x, before)


def test_check_gradient_reports_the_error_and_the_expected_size():
    w = np.linspace(0.5, 2.0, 12).reshape(3, 4)
    x, f, grad = _quadratic(w)
    msg = failure(check_gradient, FN, CASE, f, x, -grad, 1e-7, name="dlogits")  # a sign error
    assert "dlogits does not match the numerical gradient: rel error 2.0e+00, expected < 1e-07" in msg
    msg = failure(check_gradient, FN, CASE, f, x, grad[:, :3], 1e-7, name="dlogits")
    assert msg == PREFIX + "dlogits has shape (3, 3), expected (3, 4)"


def test_check_gradient_wraps_errors_in_f_and_restores_x():
    x = np.ones((2, 2))

    def f():
        raise ValueError("boom")

    msg = failure(check_gradient, FN, CASE, f, x, np.zeros((2, 2)), 1e-7)
    assert msg == PREFIX + "raised ValueError: boom"
    assert np.array_equal(x, np.ones((2, 2)))


def test_check_gradient_refuses_float32_and_reports_non_finite():
    with pytest.raises(TypeError, match="float64"):
        check_gradient(FN, CASE, lambda: 0.0, np.ones(3, dtype=np.float32), np.zeros(3), 1e-7)
    msg = failure(check_gradient, FN, CASE, lambda: 0.0, np.ones(3), np.array([0.0, np.nan, 0.0]), 1e-7)
    assert msg == PREFIX + "gradient has non-finite entries (nan or inf)"


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------


def test_reference_finds_the_lesson_file_in_the_current_directory(tmp_path, monkeypatch):
    np.savez(tmp_path / "05_router.npz", gates=np.arange(6.0).reshape(2, 3), idx=np.array([[1, 0]]))
    monkeypatch.chdir(tmp_path)
    g = reference("05", "gates")
    assert g.shape == (2, 3) and g[1, 2] == 5.0
    g[0, 0] = 99.0  # a copy: the cached values stay intact
    assert reference("05_router", "gates")[0, 0] == 0.0
    with pytest.raises(KeyError, match="05_router.npz has no reference 'nope'; it has: gates, idx"):
        reference("05", "nope")


def test_reference_missing_file_and_bad_lesson_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no reference values for lesson 42 \(42_\*\.npz\)"):
        reference("42", "x")
    with pytest.raises(ValueError, match="two digits"):
        reference("5", "x")


def test_reference_refuses_pickled_objects(tmp_path, monkeypatch):
    np.savez(tmp_path / "07_x.npz", obj=np.array([{"a": 1}], dtype=object))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="allow_pickle"):
        reference("07", "obj")


def test_reference_reads_a_rebuilt_file_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "06_x.npz"
    np.savez(path, a=np.array(1.0))
    assert reference("06", "a") == 1.0
    np.savez(path, a=np.array(2.0))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert reference("06", "a") == 2.0


def test_all_names_are_exported():
    assert sorted(checks.__all__) == sorted(
        ["CheckFailed", "case", "check_close", "check_gradient", "check_shape", "reference"]
    )
