"""lcjax: long-context LLM inference and context-extension research in JAX.

model, tokenizer = lcjax.load_model("smollm2-135m")      # or an HF directory, or a .gguf file
logits, cache = model.prefill(tokens)                   # tokens: int [batch, seq]
model = model.with_transforms(attention=my_attention)   # any `lcjax.models.AttentionFn`
tokens, cache = lcjax.generate(model, prompt, max_new_tokens=64)                  # greedy
tokens, cache = lcjax.generate(model, next_turn, 64, cache=cache, sampler=lcjax.TopP(0.9, temperature=0.7))
"""

from lcjax import positions, sharding
from lcjax.cache import Cache, KVCache
from lcjax.config import ModelConfig, RopeConfig
from lcjax.generate import generate
from lcjax.load import BUILTIN_MODELS, DEFAULT_MODEL, load_model, load_tokenizer
from lcjax.models.attention import AttentionMeta, DenseAttention
from lcjax.models.transformer import Transformer
from lcjax.sampling import Greedy, Temperature, TopK, TopP

__all__ = [
    "AttentionMeta",
    "BUILTIN_MODELS",
    "Cache",
    "DEFAULT_MODEL",
    "DenseAttention",
    "Greedy",
    "KVCache",
    "ModelConfig",
    "RopeConfig",
    "Temperature",
    "TopK",
    "TopP",
    "Transformer",
    "generate",
    "load_model",
    "load_tokenizer",
    "positions",
    "sharding",
]
