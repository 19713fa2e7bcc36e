"""titan-moe's sections of a torchtitan 0.2.2 run config (the custom config module).

A run config is one torchtitan TOML file plus these sections::

    [arch]       decoder shape            -> TitanMoEModelArgs
    [moe]        MoE design point         -> MoEArgs (enabled = false: dense)
    [data]       MDS mixture              -> titan_moe.data.config.DataConfig
    [synthetic]  toy token stream         (when [training].dataset = "synthetic")
    [metrics]    + peak_tflops, jsonl     (merged into torchtitan's [metrics])

torchtitan merges this ``JobConfig`` into its own when the module is named by
``[job].custom_config_module`` / ``--job.custom_config_module`` (or the older
``--experimental.custom_args_module``); ``titan_moe.train`` always merges it,
so run configs need not say so.  Every field can be overridden on the command
line as ``--section.key value`` (expert sets as ``--moe.expert_sets.0.top_k 2``).

The field defaults mirror ``TitanMoEModelArgs``/``MoEArgs``; the model package
does the validation (``TitanMoEModelArgs.from_sections``).
"""

# No ``from __future__ import annotations``: torchtitan's ConfigManager inspects
# field types at runtime (dataclasses.is_dataclass(field.type)) to merge sections.
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from torchtitan.config import ConfigManager
from torchtitan.config import JobConfig as TorchTitanJobConfig

from titan_moe.data.config import DataConfig
from titan_moe.data.synthetic import SyntheticConfig


@dataclass
class Arch:
    """The ``[arch]`` section: an OLMoE-like decoder's shape (see titan_moe.model.args)."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    """None: as many KV heads as query heads."""
    head_dim: int | None = None
    """None: dim // n_heads."""
    ffn_hidden: int = 1024
    """Dense SwiGLU hidden size d_ff; an expert of granularity g has g * d_ff."""
    vocab_size: int = 50280
    qk_norm: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


@dataclass
class ExpertSet:
    """One ``(n, g, k)`` expert set: n experts of granularity g, top-k routing."""

    num_experts: int = 8
    granularity: str = "1"
    """A fraction of ffn_hidden, written "1/8", "0.125" or "1"."""
    top_k: int = 1


@dataclass
class MoE:
    """The ``[moe]`` section: the MoE design point (see titan_moe.model.args.MoEArgs)."""

    enabled: bool = False
    expert_sets: list[ExpertSet] = field(default_factory=list)
    generalist_granularity: str = "0"
    """Granularity of the always-active generalist expert; "0" for none."""
    require_flop_match: bool = False
    routing: str = "dropless"
    """"dropless" or "capacity"."""
    capacity_factor: float = 1.25
    capacity_policy: str = "priority"
    """"priority" (highest-probability slots kept) or "megablocks" (token order, EP-group capacity)."""
    renormalize: bool = False
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    bias_update_rate: float = 0.0
    """Loss-free balancing step size gamma; 0 turns it off."""
    expert_impl: str = "auto"
    """"auto" (grouped GEMM on Hopper, loop elsewhere), "grouped" or "loop"."""


@dataclass
class Metrics:
    """Extra ``[metrics]`` keys, merged into torchtitan's section."""

    peak_tflops: float = 0.0
    """Peak dense TFLOP/s per device for MFU; 0 asks torchtitan (989 on H100/H200)."""

    jsonl: bool = True
    """Also append every logged step to ``{dump_folder}/metrics.jsonl`` (rank 0)."""


@dataclass
class Checkpoint:
    """Extra ``[checkpoint]`` keys, merged into torchtitan's section (see titan_moe.checkpoint)."""

    preemption_grace_seconds: float = 25.0
    """After SIGTERM, finish the step and write a final checkpoint only if it fits in this
    many seconds; torchrun kills its workers 30 s after forwarding SIGTERM."""

    fault_injection_write_delay: float = 0.0
    """Tests only: the background writer sleeps this long before writing each async save,
    so a test can kill a rank while a save is in flight."""


@dataclass
class InLoopEval:
    """The ``[eval]`` section: a suite scored every ``freq`` steps during training (see eval.inloop)."""

    tasks: str = ""
    """Suite to run, in `titan-moe eval --tasks` syntax, e.g. "paloma:c4_en+wikitext_103,boolq"; "" = off."""

    freq: int = 0
    """Run every `freq` training steps; 0 = off."""

    data_root: str = ""
    """Folder with the task data (as `titan-moe eval --data-root`)."""

    tokenizer: str = ""
    """tokenizer.json path or hub id used to encode prompts and documents."""

    eos_id: int = -1
    """End-of-text id; -1 = the tokenizer's."""

    limit: int = 0
    """First N questions / documents per subset (0 = all): keep in-loop evals short."""

    shots: str = "0"
    """Downstream few-shot settings, e.g. "0" or "0,5"."""

    batch_tokens: int = 16384
    """Tokens per forward pass (rows x padded length)."""

    validator: str = "eval.inloop:build_inloop_validator"
    """Factory of the torchtitan validator that runs the suite, as 'module:function'
    (resolved at run time: training does not import the downstream eval package)."""

    def enabled(self) -> bool:
        return bool(self.tasks) and self.freq > 0


@dataclass
class JobConfig:
    arch: Arch = field(default_factory=Arch)
    moe: MoE = field(default_factory=MoE)
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    metrics: Metrics = field(default_factory=Metrics)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    eval: InLoopEval = field(default_factory=InLoopEval)


def arch_section(job_config: Any) -> dict[str, Any]:
    """``[arch]`` as the plain dict ``TitanMoEModelArgs.from_sections`` takes."""
    return asdict(job_config.arch)


def moe_section(job_config: Any) -> dict[str, Any]:
    """``[moe]`` as the plain dict ``TitanMoEModelArgs.from_sections`` takes."""
    return asdict(job_config.moe)


class RunConfigManager(ConfigManager):
    """torchtitan's ConfigManager with titan-moe's sections always merged in.

    It also reads two TOML spellings torchtitan's loader cannot: numbers where a
    string is declared (``granularity = 0.25`` or ``generalist_granularity = 0``)
    and lists of tables for list-of-dataclass fields (``expert_sets = [{...}]``).
    """

    def __init__(self) -> None:
        super().__init__(ConfigManager._merge_configs(TorchTitanJobConfig, JobConfig))

    def _dict_to_dataclass(self, cls, data):
        if is_dataclass(cls) and isinstance(data, dict):
            hints = typing.get_type_hints(cls)
            data = dict(data)
            for f in fields(cls):
                if f.name not in data:
                    continue
                kind, value = hints.get(f.name), data[f.name]
                if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
                    data[f.name] = str(value)
                elif typing.get_origin(kind) is list and isinstance(value, list):
                    (item,) = typing.get_args(kind) or (None,)
                    if is_dataclass(item):
                        data[f.name] = [self._dict_to_dataclass(item, v) if isinstance(v, dict) else v for v in value]
        return super()._dict_to_dataclass(cls, data)


def parse_run_config(argv: list[str]) -> Any:
    """Parse ``--job.config_file RUN.toml [--section.key value ...]`` into a merged JobConfig."""
    return RunConfigManager().parse_args(list(argv))
