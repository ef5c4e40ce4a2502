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
    flat_ids, rows = ids.reshape(-1), dy.reshape(-1, C)
    if backend.is_cupy_array(dy) or flat_ids.size == 0:
        return backend.scatter_add(dw, flat_ids, rows)  # an atomic-add kernel on the GPU
    # CPU: sort the positions by id and sum each run of equal ids with add.reduceat: the same
    # sums as scatter_add (np.add.at), about 3x faster. Each id then gets ONE assignment.
    order = xp.argsort(flat_ids, kind="stable")
    sorted_ids = flat_ids[order]
    starts = xp.flatnonzero(xp.concatenate([[True], sorted_ids[1:] != sorted_ids[:-1]]))
    dw[sorted_ids[starts]] = xp.add.reduceat(rows[order], starts, axis=0)
    return dw
