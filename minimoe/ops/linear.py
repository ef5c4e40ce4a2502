"""Linear (fully connected) layer: y = x @ w + b.

Weights are stored (C_in, C_out), so the forward is a plain matmul with no transpose; this is
also the layout of GPT-2's `Conv1D` and of our stacked experts `(E, C, F)`.
"""

from typing import Any, NamedTuple


class LinearCache(NamedTuple):
    x: Any  # (..., C_in) the input
    w: Any  # (C_in, C_out) the weight
    has_bias: bool  # whether a bias was added (its gradient is then returned)


def linear_forward(x, w, b=None):
    """(..., C_in) @ (C_in, C_out) [+ (C_out,)] -> (..., C_out)."""
    # one 2-D matmul over all leading positions: NumPy runs a 3-D @ 2-D product as a loop of
    # smaller matmuls, measurably slower than a single big one
    y = (x.reshape(-1, w.shape[0]) @ w).reshape(*x.shape[:-1], w.shape[1])
    if b is not None:
        y += b
    return y, LinearCache(x, w, b is not None)


def linear_backward(dy, cache):
    """dy (..., C_out) -> dx (..., C_in), dw (C_in, C_out), db (C_out,) or None.

    y = x w + b  =>  dL/dx = dy w^T,  dL/dw = x^T dy (summed over every leading position),
    dL/db = sum of dy over every leading position.
    """
    x, w = cache.x, cache.w
    c_in, c_out = w.shape
    dy2 = dy.reshape(-1, c_out)  # (N, C_out), N = all leading positions
    dx = (dy2 @ w.T).reshape(*dy.shape[:-1], c_in)
    dw = x.reshape(-1, c_in).T @ dy2
    db = dy2.sum(axis=0) if cache.has_bias else None
    return dx, dw, db
