"""Linear (fully connected) layer: y = x @ w + b.

Weights are stored (C_in, C_out), so the forward is a plain matmul with no transpose; this is
also the layout of GPT-2's `Conv1D` and of our stacked experts `(E, C, F)`.
"""


def linear_forward(x, w, b=None):
    """(..., C_in) @ (C_in, C_out) [+ (C_out,)] -> (..., C_out)."""
    y = x @ w
    if b is not None:
        y += b
    return y, (x, w, b is not None)


def linear_backward(dy, cache):
    """dy (..., C_out) -> dx (..., C_in), dw (C_in, C_out), db (C_out,) or None.

    y = x w + b  =>  dL/dx = dy w^T,  dL/dw = x^T dy (summed over every leading position),
    dL/db = sum of dy over every leading position.
    """
    x, w, has_bias = cache
    c_in, c_out = w.shape
    dx = dy @ w.T
    dw = x.reshape(-1, c_in).T @ dy.reshape(-1, c_out)
    db = dy.reshape(-1, c_out).sum(axis=0) if has_bias else None
    return dx, dw, db
