"""Import and export Hugging Face weights (GPT-2, Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, Granite-MoE,
Granite-MoE-Shared, DeepSeek-V3; docs/hf.md, docs/families.md); read local checkpoints without torch.

    from minimoe import hf
    model = hf.from_hf(state_dict, hf_config)            # HF names -> minimoe.GPT (logits equal HF's)
    sd = hf.to_hf(model)                                 # minimoe.GPT -> HF names (numpy arrays)
    model, tokenizer = hf.load_pretrained("path/to/dir") # config.json + *.safetensors (+ tokenizer.json)
    hf.save_pretrained(model, "path/to/dir")             # the reverse: transformers can load the folder

Where each part lives:
    hf/config.py          config.json <-> Config (config_from_hf, hf_config_from, family)
    hf/families.py        the MoE families' config.json tables and decisions
    hf/names.py           the name maps as tables: which HF tensors make each of our parameters, and how
    hf/load.py            from_hf / to_hf, load_pretrained / save_pretrained, the tokenizer wrapper
    minimoe/safetensors.py  the file format, read and written with numpy alone
Nothing here downloads anything; torch, transformers and tokenizers are never needed to load.
"""

from minimoe.hf.config import MODEL_TYPES, config_from_hf, hf_config_from
from minimoe.hf.load import (
    LAYOUTS,
    HFTokenizer,
    from_hf,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
    to_hf,
)
from minimoe.safetensors import read_checkpoint, read_safetensors, write_safetensors

__all__ = [
    "LAYOUTS",
    "MODEL_TYPES",
    "HFTokenizer",
    "config_from_hf",
    "from_hf",
    "hf_config_from",
    "load_pretrained",
    "load_tokenizer",
    "read_checkpoint",
    "read_safetensors",
    "save_pretrained",
    "to_hf",
    "write_safetensors",
]
