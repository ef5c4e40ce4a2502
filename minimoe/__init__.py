"""minimoe: a from-scratch NumPy GPT-style Mixture-of-Experts language model.

import minimoe
config = minimoe.get_preset("mixtral")
model = minimoe.GPT(config, seed=0)
logits, loss = model.forward(idx, targets)
model.backward()              # model.grads, same keys as model.params
"""

from minimoe import gradcheck  # noqa: F401
from minimoe.backend import (  # noqa: F401
    BackendError,
    get_backend,
    get_default_dtype,
    get_xp,
    set_backend,
    set_default_dtype,
    to_numpy,
)
from minimoe.config import Config  # noqa: F401
from minimoe.model import GPT  # noqa: F401
from minimoe.optim import AdamW, clip_grad_norm, cosine_lr  # noqa: F401
from minimoe.presets import PRESETS, count_params, get_preset  # noqa: F401
from minimoe.threads import set_threads  # noqa: F401

__version__ = "0.1.0"
