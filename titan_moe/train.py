"""Train a titan_moe run config with torchtitan 0.2.2.

Cluster entry point (one process per GPU)::

    torchrun --nnodes N --nproc_per_node G -m titan_moe.train \\
        --job.config_file RUN.toml [--section.key value ...]

Locally, ``titan-moe train RUN.toml --nproc N`` wraps this (``launch.py``).
Without torchrun it runs as a single process.

``TitanMoETrainer`` is torchtitan's ``Trainer`` with three additions:

- the loss adds the MoE auxiliary losses, scaled so their weight does not
  depend on the data-parallel degree or on gradient accumulation (below);
- after each optimizer step, expert loads are reduced over all data ranks and
  the loss-free balancing biases updated (``train_spec.ExpertLoadBalancer``);
- every log step reports LM and auxiliary losses separately and per-layer,
  per-set MoE statistics (``metrics.py``);
- checkpoints go through ``titan_moe.checkpoint`` (committed-marker async
  saves, local or s3, damaged ones skipped on resume), and SIGTERM stops all
  ranks after the same step with a final checkpoint and exit status
  ``PREEMPTED_EXIT_CODE`` (75).
"""

# The CPU adapter must run before anything imports torchtitan (see platform.py).
from titan_moe.infra import platform

platform.activate()

import os  # noqa: E402
import socket  # noqa: E402
from datetime import timedelta  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torchtitan.components.dataloader import DataloaderExhaustedError  # noqa: E402
from torchtitan.components.loss import IGNORE_INDEX  # noqa: E402
from torchtitan.distributed import utils as dist_utils  # noqa: E402
from torchtitan.tools.logging import init_logger, logger  # noqa: E402
from torchtitan.train import Trainer  # noqa: E402

from titan_moe import train_spec  # noqa: E402
from titan_moe.checkpoint import PREEMPTED_EXIT_CODE, CheckpointManager, PreemptionHandler  # noqa: E402
from titan_moe.errors import ConfigError  # noqa: E402
from titan_moe.job_config import parse_run_config  # noqa: E402
from titan_moe.metrics import MoEStepStats, load_metrics  # noqa: E402
from titan_moe.model.transformer import Transformer  # noqa: E402
from titan_moe.preflight import check_run  # noqa: E402


class Preempted(Exception):
    """Raised out of the training loop after the final checkpoint of a preempted run."""


class TitanMoETrainer(Trainer):
    def __init__(self, job_config: Any):
        self.step_stats = MoEStepStats()
        super().__init__(job_config)
        self.run_args = self.model_args.args
        self._layout_independent_init(job_config)
        self.balancer = getattr(self.optimizers, "moe_balancer", None)
        self.metrics_processor.extra_metrics_fn = self.moe_metrics
        self._use_titan_checkpointer(job_config)
        self.preemption = PreemptionHandler(job_config.checkpoint.preemption_grace_seconds)

    def _use_titan_checkpointer(self, job_config: Any) -> None:
        """Swap torchtitan's CheckpointManager for ours (same calls, commit markers, s3)."""
        self.checkpointer.close()
        self.checkpointer = CheckpointManager(
            model_parts=self.model_parts, optimizers=self.optimizers, lr_schedulers=self.lr_schedulers,
            dataloader=self.dataloader, train_state=self, config=job_config.checkpoint,
            base_folder=job_config.job.dump_folder,
        )

    # -- the loop -----------------------------------------------------------------
    def train(self) -> None:
        """torchtitan's loop, with resume bookkeeping and preemption at step boundaries."""
        job_config = self.job_config
        if self.checkpointer.load(step=job_config.checkpoint.load_step):
            self.metrics_processor.resume_at(self.step)
        logger.info(f"Training starts at step {self.step + 1}")
        data_iterator = self.batch_generator(self.dataloader)
        while self.should_continue_training():
            self.step += 1
            self.gc_handler.run(self.step)
            try:
                self.train_step(data_iterator)
            except DataloaderExhaustedError:
                logger.warning("Ran out of data; last step was canceled.")
                break
            # Every rank asks every step, so all stop after the same step.
            if self.preemption.should_stop(device=self.device):
                self._checkpoint_and_stop()
            self.checkpointer.save(self.step, last_step=self.step == job_config.training.steps)
            if job_config.validation.enable and self.validator.should_validate(self.step):
                self.validator.validate(self.model_parts, self.step)
            if job_config.eval.enabled() and self.step % job_config.eval.freq == 0:
                self._evaluate_in_loop()
            if self.step == 1:  # first step done: compile and lazy init are behind us
                dist_utils.set_pg_timeouts(
                    timeout=timedelta(seconds=job_config.comm.train_timeout_seconds), parallel_dims=self.parallel_dims
                )
        # Leave together: a rank that tears down its process groups while a peer is still
        # in its last collective aborts the peer (torchtitan hides this with a 2 s sleep).
        _barrier()

    def _evaluate_in_loop(self) -> None:
        """The run config's ``[eval]`` suite on the live (sharded) model, every rank in lock-step."""
        # Imported here: the eval package sits downstream of training and only runs that
        # ask for in-loop eval should depend on it.
        from eval.inloop import maybe_evaluate

        scalars = maybe_evaluate(self.job_config.eval, self.step, self.model_parts[0],
                                 seq_len=self.job_config.training.seq_len, name=self.job_config.job.description)
        if scalars:
            self.metrics_processor.logger.log(scalars, self.step)

    def _checkpoint_and_stop(self) -> None:
        self.checkpointer.wait()  # an in-flight async save finishes first
        if self.preemption.can_afford_save(self.checkpointer.last_save_seconds):
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
        """Called by the metrics processor on log steps, on every rank (collectives)."""
        mesh = self.parallel_dims.get_optional_mesh("loss")
        out = self.step_stats.reduce(mesh.get_group() if mesh is not None else None)
        if self.balancer is not None:
            model = self.model_parts[0]
            biases = {name: stats["expert_bias"] for name, stats in model.moe_stats().items()}
            out |= load_metrics(self.balancer.last_global_load, biases, self.run_args.moe.bias_update_rate > 0)
        return out


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
        args, mesh = check_run(config, int(os.environ["WORLD_SIZE"]))
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
        if trainer is not None:
            trainer.close()  # waits for an in-flight checkpoint
    return 0


def main(argv: list[str] | None = None) -> int:
    init_logger()
    try:
        return run(sys.argv[1:] if argv is None else list(argv))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
