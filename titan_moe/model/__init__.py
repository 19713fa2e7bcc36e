"""The titan_moe decoder: dense or Mixture-of-Experts FFNs over the paper's design space."""

from titan_moe.model.args import ExpertSetArgs, MoEArgs, TitanMoEModelArgs
from titan_moe.model.transformer import Transformer

__all__ = ["ExpertSetArgs", "MoEArgs", "TitanMoEModelArgs", "Transformer"]
