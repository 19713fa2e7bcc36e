"""titan-moe: Mixture-of-Experts pretraining research on torchtitan."""

__version__ = "0.1.0"
