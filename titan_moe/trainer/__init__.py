"""The trainer's parts: torchtitan train spec and builders, MoE metrics, the orderly shutdown."""
