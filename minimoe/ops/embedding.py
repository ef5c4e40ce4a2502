"""Token and position embeddings: a table lookup, and its scatter-add backward."""

from minimoe import backend


def embedding_forward(ids, w):
    """ids (B, T) integer, w (V, C) -> (B, T, C): row ids[b, t] of the table."""
    return w[ids], (ids, w.shape)


def embedding_backward(dy, cache):
    """dy (B, T, C) -> dw (V, C).

    The lookup copies row w[i] to every position that holds id i, so the gradient of row i is the
    SUM of dy over all those positions. A plain `dw[ids] += dy` would be wrong: with repeated
    ids, fancy-index assignment keeps only one of the updates. `scatter_add` accumulates them.
    """
    ids, (V, C) = cache
    xp = backend.xp_of(dy)
    dw = xp.zeros((V, C), dtype=dy.dtype)
    backend.scatter_add(dw, ids.reshape(-1), dy.reshape(-1, C))
    return dw
