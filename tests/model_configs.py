"""Small model configurations shared by the model tests."""

from titan_moe.model.args import TitanMoEModelArgs

ARCH = {"dim": 32, "n_layers": 2, "n_heads": 4, "ffn_hidden": 64, "vocab_size": 300}


def model_args(moe: dict | None = None, seq_len: int = 16, **arch) -> TitanMoEModelArgs:
    return TitanMoEModelArgs.from_sections(ARCH | arch, moe, seq_len)


DENSE = None
HOMOGENEOUS = {"enabled": True, "expert_sets": [{"num_experts": 8, "granularity": "1/4", "top_k": 4}]}
HETEROGENEOUS = {
    "enabled": True,
    "expert_sets": [
        {"num_experts": 4, "granularity": "1/2", "top_k": 1},
        {"num_experts": 8, "granularity": "1/8", "top_k": 2},
    ],
    "generalist_granularity": "1/4",
}
GENERALIST = {
    "enabled": True,
    "expert_sets": [{"num_experts": 16, "granularity": "1/8", "top_k": 4}],
    "generalist_granularity": "1/2",
}
