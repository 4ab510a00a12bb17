"""Training through the same decoder inference runs: the causal LM loss, a jitted optimiser step and its state;
`lcjax.train.data` (corpora, packing, resumable batches) and `lcjax.train.checkpoint` (orbax) beside them."""

from lcjax.train.loss import causal_lm_loss
from lcjax.train.step import TrainConfig, TrainState, init_state, loss_and_count, train_step

__all__ = ["TrainConfig", "TrainState", "causal_lm_loss", "init_state", "loss_and_count", "train_step"]
