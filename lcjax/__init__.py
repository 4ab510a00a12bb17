"""lcjax: long-context LLM inference and context-extension research in JAX.

    model, tokenizer = lcjax.load_model("smollm2-135m")      # or an HF directory, or a .gguf file
    logits, cache = model.prefill(tokens)                   # tokens: int [batch, seq]
    model = model.with_transforms(attention=my_attention)   # any `lcjax.attention.AttentionFn`
"""

from lcjax import attention, positions, sharding
from lcjax.attention import AttentionMeta, DenseAttention
from lcjax.cache import KVCache
from lcjax.config import ModelConfig, RopeConfig
from lcjax.loading.model import BUILTIN_MODELS, DEFAULT_MODEL, load_model
from lcjax.models.transformer import Transformer

__all__ = [
    "AttentionMeta", "BUILTIN_MODELS", "DEFAULT_MODEL", "DenseAttention", "KVCache", "ModelConfig", "RopeConfig",
    "Transformer", "attention", "load_model", "positions", "sharding",
]
