"""Models: the Llama-family decoder, the attention protocol it calls, and its parameter declarations.

A model is params + config + transforms: `Transformer` runs `forward` with an attention transform
(`AttentionFn`, default `DenseAttention`), a position transform and, optionally, a cache transform.
"""

from lcjax.models.attention import AttentionFn, AttentionMeta, DenseAttention
from lcjax.models.params import ParamSpec, abstract_params, init_params, param_shardings, param_specs
from lcjax.models.transformer import Transformer, forward, lm_logits

__all__ = [
    "AttentionFn",
    "AttentionMeta",
    "DenseAttention",
    "ParamSpec",
    "Transformer",
    "abstract_params",
    "forward",
    "init_params",
    "lm_logits",
    "param_shardings",
    "param_specs",
]
