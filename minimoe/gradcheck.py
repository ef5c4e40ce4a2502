"""Numerical gradient checks: central differences in float64 against a hand-written backward.

    df/dx_i ~ (f(x + eps e_i) - f(x - eps e_i)) / (2 eps)        error O(eps^2) + round-off/eps

With float64 and eps = 1e-6 the two error terms are ~1e-12 and ~1e-10 relative to f, so a
correct backward agrees to ~1e-8 or better, and a wrong one (a missing term, a wrong sign, a
transpose) typically disagrees at 1e-2 or worse. Checks run in float64: float32's round-off
(1e-7) divided by eps would drown the comparison.

The error we report for a tensor is the max-norm relative error
    rel_error(a, n) = max_i |a_i - n_i| / max(max_i |a_i|, max_i |n_i|)
which is scale free and not fooled by entries that happen to be near zero.
"""

from __future__ import annotations

import numpy

from minimoe import backend


def rel_error(a, b) -> float:
    """Max-norm relative error between two arrays (0 when both are all zeros)."""
    a = backend.to_numpy(a).astype(numpy.float64)
    b = backend.to_numpy(b).astype(numpy.float64)
    scale = max(numpy.abs(a).max(initial=0.0), numpy.abs(b).max(initial=0.0))
    if scale == 0.0:
        return 0.0
    return float(numpy.abs(a - b).max() / scale)


def _pick(size, max_entries, rng):
    if max_entries is None or size <= max_entries:
        return numpy.arange(size)
    return numpy.sort(rng.choice(size, max_entries, replace=False))


def numerical_gradient(f, x, eps=1e-6, max_entries=None, seed=0):
    """Central-difference gradient of the scalar function f() with respect to array x.

    f takes no arguments and reads x, which is perturbed IN PLACE (and restored). Returns
    (flat_indices, numeric values at those indices): all entries, or `max_entries` of them
    chosen at random (seeded) for large arrays.
    """
    if x.dtype != numpy.float64 and str(x.dtype) != "float64":
        raise ValueError(f"gradient checks need float64 arrays, got {x.dtype}")
    rng = numpy.random.default_rng(seed)
    picks = _pick(x.size, max_entries, rng)
    flat = x.reshape(-1)  # a view: writing to it perturbs x
    out = numpy.empty(len(picks))
    for j, i in enumerate(picks):
        old = float(flat[i])
        flat[i] = old + eps
        fp = float(f())
        flat[i] = old - eps
        fm = float(f())
        flat[i] = old
        out[j] = (fp - fm) / (2 * eps)
    return picks, out


def check_gradients(f, arrays: dict, grads: dict, eps=1e-6, max_entries=None, seed=0) -> dict:
    """Compare analytic `grads` with central differences of scalar f() for each named array.

    Returns {name: rel_error}. `arrays` are perturbed in place (and restored).
    """
    errors = {}
    for name, x in arrays.items():
        picks, num = numerical_gradient(f, x, eps, max_entries, seed)
        ana = backend.to_numpy(grads[name]).reshape(-1)[picks]
        errors[name] = rel_error(ana, num)
    return errors


def check_op(forward, backward, inputs, wrt=None, eps=1e-6, seed=0, max_entries=None) -> dict:
    """Gradient check of a forward/backward pair.

    forward(*inputs) -> (y, cache) [extra outputs after cache are ignored];
    backward(dy, cache) -> one gradient or a tuple of gradients, one per input in `wrt`
    (default: every input, in order). We draw a random dy and check the gradients of
    L = sum(y * dy), whose gradient with respect to y is exactly dy.
    Returns {input position: rel_error}.
    """
    rng = numpy.random.default_rng(seed)
    wrt = list(range(len(inputs))) if wrt is None else list(wrt)
    out = forward(*inputs)
    y, cache = out[0], out[1]
    xp = backend.xp_of(y)
    dy = xp.asarray(rng.standard_normal(y.shape))
    grads = backward(dy, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) != len(wrt):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(wrt)} checked inputs")

    def f():
        return float((forward(*inputs)[0] * dy).sum())

    arrays = {i: inputs[i] for i in wrt}
    return check_gradients(f, arrays, dict(zip(wrt, grads)), eps, max_entries, seed)


def check_model(model, idx, targets, eps=1e-6, max_entries=None, seed=0, names=None) -> dict:
    """Gradient check of a whole model (float64): every parameter tensor (or `names`).

    Runs forward+backward once for the analytic gradients, then perturbs the parameters. The
    model must be deterministic between calls: dropout and router noise are off (eval mode).
    """
    if model.dtype != "float64":
        raise ValueError(
            f"check_model needs a float64 model (GPT(config, dtype='float64')), got {model.dtype}"
        )
    was_training = model.training
    model.eval()
    try:
        model.forward(idx, targets)
        grads = {k: v.copy() for k, v in model.backward().items()}
        arrays = {k: model.params[k] for k in (names or model.params)}
        return check_gradients(lambda: model.forward(idx, targets)[1], arrays, grads, eps, max_entries, seed)
    finally:
        model.training = was_training
