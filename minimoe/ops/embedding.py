"""Token and position embeddings: a table lookup, and its scatter-add backward."""

from minimoe import backend


def embedding_forward(ids, w):
    """ids (B, T) integer, w (V, C) -> (B, T, C): row ids[b, t] of the table.  y[b, t] = w[ids[b, t]]."""
    return w[ids], (ids, w.shape)


def embedding_backward_reference(dy, cache):
    """dy (B, T, C) -> dw (V, C), the plain twin of `embedding_backward`:
    dw[i] = sum of dy[b, t] over every position with ids[b, t] == i."""
    ids, (V, C) = cache
    xp = backend.xp_of(dy)
    dw = xp.zeros((V, C), dtype=dy.dtype)
    xp.add.at(dw, ids.reshape(-1), dy.reshape(-1, C))  # dw[ids[n]] += dy[n], every repeat adding
    return dw


def embedding_backward(dy, cache):
    """dy (B, T, C) -> dw (V, C).   dw[i] = sum of dy[b, t] over every position with ids[b, t] == i.

    The lookup copies row w[i] to every position that holds id i, so the gradient of row i is the
    SUM of dy over all those positions. A plain `dw[ids] += dy` would be wrong: with repeated
    ids, fancy-index assignment keeps only one of the updates. `add.at` accumulates them.
    """
    # Fast twin of embedding_backward_reference: backend.segment_sum picks the fastest exact
    # sum per id of each backend (a sort and add.reduceat on the CPU, an atomic add on the GPU).
    ids, (V, C) = cache
    return backend.segment_sum(dy.reshape(-1, C), ids.reshape(-1), V)
