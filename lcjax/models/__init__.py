"""Models: the Llama-family decoder and its parameter declarations."""

from lcjax.models.params import ParamSpec, abstract_params, init_params, param_shardings, param_specs
from lcjax.models.transformer import Transformer, forward, lm_logits

__all__ = [
    "ParamSpec",
    "Transformer",
    "abstract_params",
    "forward",
    "init_params",
    "lm_logits",
    "param_shardings",
    "param_specs",
]
