"""Pure forward/backward pairs: `y, cache = name_forward(...)`, `grads = name_backward(dy, cache)`.

One file per family. Ops take their array module from their inputs (`backend.xp_of`), so they
run unchanged on numpy and cupy. They know nothing of the model.
"""

from minimoe.ops.activation import (  # noqa: F401
    gelu_backward,
    gelu_forward,
    sigmoid,
    silu_backward,
    silu_forward,
    softmax_backward,
    softmax_forward,
    swiglu_backward,
    swiglu_forward,
)
from minimoe.ops.attention import (  # noqa: F401
    causal_attention_backward,
    causal_attention_forward,
    rope_backward,
    rope_forward,
    rope_tables,
)
from minimoe.ops.dropout import dropout_backward, dropout_forward  # noqa: F401
from minimoe.ops.embedding import embedding_backward, embedding_forward  # noqa: F401
from minimoe.ops.ffn import (  # noqa: F401
    gelu_mlp_backward,
    gelu_mlp_forward,
    swiglu_mlp_backward,
    swiglu_mlp_forward,
)
from minimoe.ops.linear import linear_backward, linear_forward  # noqa: F401
from minimoe.ops.loss import cross_entropy_backward, cross_entropy_forward  # noqa: F401
from minimoe.ops.norm import layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward  # noqa: F401
