"""Train a titan_moe run config with torchtitan 0.2.2.

Cluster entry point (one process per GPU)::

    torchrun --nnodes N --nproc_per_node G -m titan_moe.train \\
        --job.config_file RUN.toml [--section.key value ...]

Locally, ``titan-moe train RUN.toml --nproc N`` wraps this (``launch.py``).
Without torchrun it runs as a single process.

``TitanMoETrainer`` is torchtitan's ``Trainer`` (its own ``train()`` loop, so
every torchtitan section works, ``[profiling]`` included) with these additions
through its hooks:

- the loss adds the MoE auxiliary losses, scaled so their weight does not
  depend on the data-parallel degree or on gradient accumulation (below);
- after each optimizer step, expert loads are reduced over all data ranks and
  the loss-free balancing biases updated (``train_spec.ExpertLoadBalancer``);
- every log step reports LM and auxiliary losses separately and per-layer,
  per-set MoE statistics (``metrics.py``);
- checkpoints go through ``titan_moe.checkpoint`` (committed-marker async
  saves, local or s3, damaged ones skipped on resume), and SIGTERM stops all
  ranks after the same step with a final checkpoint and exit status
  ``PREEMPTED_EXIT_CODE`` (75);
- ``[eval]`` runs as a validator built by the factory the config names by
  import path (titan_moe never imports the downstream eval package);
- every exit (finished, preempted, crashed) tears down in a fixed order
  (``shutdown.py``: why and how).
"""

# The CPU adapter must run before anything imports torchtitan (see platform.py).
from titan_moe.infra import platform

platform.activate()

import copy  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torchtitan.components.loss import IGNORE_INDEX  # noqa: E402
from torchtitan.tools.logging import init_logger, logger  # noqa: E402
from torchtitan.train import Trainer  # noqa: E402

from titan_moe.trainer import shutdown, train_spec  # noqa: E402
from titan_moe.checkpoint import PREEMPTED_EXIT_CODE, CheckpointManager, PreemptionHandler  # noqa: E402
from titan_moe.data import run_tokenizer  # noqa: E402
from titan_moe.common.errors import ConfigError  # noqa: E402
from titan_moe.run_config.job_config import parse_run_config  # noqa: E402
from titan_moe.trainer.metrics import MoEStepStats, load_metrics  # noqa: E402
from titan_moe.model.transformer import Transformer  # noqa: E402
from titan_moe.run_config.preflight import plan_run  # noqa: E402


class Preempted(Exception):
    """Raised out of the training loop after the final checkpoint of a preempted run."""


class TitanMoETrainer(Trainer):
    """torchtitan's ``Trainer``; its ``train()`` loop runs unchanged, extended through hooks:

    =============================  ===============================================
    ``__init__``                   our CheckpointManager replaces torchtitan's;
                                   ``[eval]`` joins the validators
    ``load_state_dict``            resume bookkeeping: metric logs forget the
                                   steps after the restored checkpoint
    ``should_continue_training``   preemption, agreed at step boundaries
    ``forward_backward_step``      LM loss + MoE auxiliary losses
    ``train_step``                 MoE statistics on log steps
    ``train``                      torchtitan's loop (profiling, validation,
                                   checkpoints) + an end barrier
    =============================  ===============================================
    """

    def __init__(self, job_config: Any):
        self.step_stats = MoEStepStats()
        self.preemption: PreemptionHandler | None = None
        # torchtitan would build its own CheckpointManager -- in async mode with a gloo group
        # every rank must join -- only for it to be replaced by ours: it sees [checkpoint]
        # disabled, ours acts on the real section (_use_titan_checkpointer).
        super().__init__(_checkpointing_off(job_config))
        self.job_config = job_config
        self.run_args = self.model_args.args
        self._layout_independent_init(job_config)
        self.balancer = getattr(self.optimizers, "moe_balancer", None)
        self.metrics_processor.extra_metrics_fn = self.moe_metrics
        self._use_titan_checkpointer(job_config)
        self._add_inloop_eval(job_config)
        # Its own gloo group: the agreement runs asynchronously beside training and
        # background checkpoint saves (see checkpoint/preemption.py).
        group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.preemption = PreemptionHandler(job_config.checkpoint.preemption_grace_seconds, group=group)

    def _use_titan_checkpointer(self, job_config: Any) -> None:
        """Swap torchtitan's CheckpointManager for ours (same calls, commit markers, s3)."""
        self.checkpointer.close()
        self.checkpointer = CheckpointManager(
            model_parts=self.model_parts, optimizers=self.optimizers, lr_schedulers=self.lr_schedulers,
            dataloader=self.dataloader, train_state=self, config=job_config.checkpoint,
            base_folder=job_config.job.dump_folder,
        )
        if not dist.is_initialized() or dist.get_rank() == 0:
            # The checkpoints keep the tokenizer they were trained with: eval and export find it
            # there even after the data moved (titan_moe.data.run_tokenizer).
            where = run_tokenizer.record(job_config)
            if where:
                logger.info("tokenizer recorded at %s", where)

    def _add_inloop_eval(self, job_config: Any) -> None:
        """``[eval]`` runs as one more validator in torchtitan's loop.

        The validator is built by the factory ``[eval].validator`` names by import
        path, so titan_moe never imports the eval package (it sits downstream).
        """
        if not job_config.eval.enabled():
            return
        factory = train_spec.import_factory(job_config.eval.validator, "eval.validator")
        inloop = factory(job_config=job_config, metrics_processor=self.metrics_processor)
        existing = [self.validator] if job_config.validation.enable else []
        self.validator = train_spec.ValidatorSet([*existing, inloop])
        job_config.validation.enable = True  # torchtitan's loop calls validators only when set

    # -- hooks into torchtitan's train() -------------------------------------------
    def train(self) -> None:
        super().train()  # torchtitan's loop, incl. maybe_enable_profiling
        # Leave together: a rank that tears down its process groups while a peer is still
        # in its last collective aborts the peer.
        _barrier()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called when a checkpoint restores ``train_state``: logs continue after its step."""
        super().load_state_dict(state_dict)
        self.metrics_processor.resume_at(self.step)

    def should_continue_training(self) -> bool:
        """Asked by the loop before every step, on every rank: the step limit, then preemption."""
        if not super().should_continue_training():
            return False
        if self.preemption is not None and self.preemption.poll():
            self._checkpoint_and_stop()
        return True

    def _checkpoint_and_stop(self) -> None:
        self.checkpointer.wait()  # an in-flight async save finishes first
        if self.checkpointer.last_committed_step == self.step:
            logger.warning(f"preempted: final checkpoint at step {self.step} committed; exiting {PREEMPTED_EXIT_CODE}")
        elif self.preemption.can_afford_save(self.checkpointer.last_save_seconds):
            self.checkpointer.save_now(self.step)
            logger.warning(f"preempted: final checkpoint at step {self.step} committed; exiting {PREEMPTED_EXIT_CODE}")
        else:
            logger.warning("preempted: no time left for a final checkpoint; the last committed one stands")
        _barrier()
        raise Preempted()

    def _layout_independent_init(self, job_config: Any) -> None:
        """Same initial weights for any DP/EP layout (the platform decides whether to act)."""
        seed = job_config.debug.seed if job_config.debug.seed is not None else 0

        def full_model() -> Transformer:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = Transformer(self.run_args)
                model.init_weights()
            return model

        platform.adapt_init(self.model_parts, full_model)

    # -- loss ---------------------------------------------------------------------
    def forward_backward_step(
        self, *, input_dict: dict[str, torch.Tensor], labels: torch.Tensor, global_valid_tokens: torch.Tensor
    ) -> torch.Tensor:
        """LM loss plus MoE auxiliary losses, for one microbatch.

        torchtitan 0.2.2 makes the LM term ``local_sum / global_valid_tokens`` and
        *sums* gradients over data-parallel ranks and microbatches, so the
        gradient is that of the global token mean.  The model's auxiliary loss
        is a mean over this rank's microbatch; weighting it by
        ``local_tokens / global_valid_tokens`` makes the summed gradient that of
        the token-weighted mean of the per-microbatch aux losses: its effective
        weight is ``aux_loss_weight`` for any DP degree or accumulation count
        (adding it unweighted would multiply it by their product).
        """
        model = self.model_parts[0]
        inputs, labels, extra_inputs, extra_kwargs = self.post_dataloading_process(input_dict, labels)
        with self.train_context():
            with self.maybe_enable_amp:
                pred = model(inputs, **extra_inputs, **extra_kwargs)
                lm_loss = self.loss_fn(pred, labels) / global_valid_tokens
                loss = lm_loss
                aux = model.moe_aux_loss()
                share = (labels != IGNORE_INDEX).sum() / global_valid_tokens
                if aux is not None:
                    loss = loss + aux * share
            del pred
            loss.backward()
        if self.metrics_processor.should_log(self.step):
            moe = self.run_args.moe
            self.step_stats.add_microbatch(lm_loss, model.moe_stats(), share, moe.aux_loss_weight, moe.z_loss_weight)
        return loss

    def train_step(self, data_iterator) -> None:
        logging = self.metrics_processor.should_log(self.step)
        if self.balancer is not None:
            # Reduce the expert load for metrics on log steps even without loss-free balancing.
            self.balancer.want_load = logging
        self.step_stats.reset()
        super().train_step(data_iterator)

    # -- metrics ------------------------------------------------------------------
    def moe_metrics(self) -> dict[str, float]:
        """Called by the metrics processor on log steps, on every rank (collectives).

        All MoE metrics of the step cost one all-reduce and one host transfer.
        """
        mesh = self.parallel_dims.get_optional_mesh("loss")
        global_values: dict[str, torch.Tensor] = {}
        if self.balancer is not None:
            model = self.model_parts[0]
            biases = {name: stats["expert_bias"] for name, stats in model.moe_stats().items()}
            global_values = load_metrics(self.balancer.last_global_load, biases, self.run_args.moe.bias_update_rate > 0)
        return self.step_stats.reduce(mesh.get_group() if mesh is not None else None, global_values)


def _checkpointing_off(job_config: Any) -> Any:
    """A shallow copy of the run config whose ``[checkpoint]`` is disabled (the plan attached
    to the config travels with the copy; every other section is shared)."""
    view = copy.copy(job_config)
    view.checkpoint = dataclasses.replace(job_config.checkpoint, enable=False)
    return view


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _single_process_env() -> None:
    """Let ``python -m titan_moe.train`` run without torchrun, as one rank."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def run(argv: list[str]) -> int:
    """Train one run config in this process (the process group is left up for reuse)."""
    _single_process_env()
    try:
        config = parse_run_config(argv)
        mesh = plan_run(config, int(os.environ["WORLD_SIZE"])).mesh
    except ConfigError as exc:
        # Before init_process_group: every rank prints the same message and exits.
        print(f"titan_moe.train: invalid run config: {exc}", file=sys.stderr)
        return 2
    train_spec.register()
    logger.info(f"titan-moe: world {mesh.world_size} = dp_replicate {mesh.dp_replicate} x dp_shard "
                f"{mesh.dp_shard}; EP {mesh.ep} (experts FSDP over {mesh.efsdp})")

    trainer: TitanMoETrainer | None = None
    try:
        trainer = TitanMoETrainer(config)
        if config.checkpoint.create_seed_checkpoint:
            trainer.checkpointer.save(curr_step=0, last_step=True)
        else:
            trainer.train()
    except Preempted:
        return PREEMPTED_EXIT_CODE
    finally:
        # Steps 1-4 of the orderly shutdown (see shutdown.py), on every path.
        shutdown.release_trainer(trainer)
        trainer = None
    return 0


def main(argv: list[str] | None = None) -> int:
    init_logger()
    status = 1  # stays 1 when run() raises
    try:
        status = run(sys.argv[1:] if argv is None else list(argv))
    finally:
        # Step 5, last: the process groups, destroyed before interpreter teardown
        # (root cause of the exit -6 aborts: shutdown.py).  The end barrier only on
        # paths where every rank gets here (finished or preempted together).
        shutdown.destroy_process_groups(clean=status in (0, PREEMPTED_EXIT_CODE))
    return status


if __name__ == "__main__":
    sys.exit(main())
