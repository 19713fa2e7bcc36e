"""Asynchronous distributed checkpoints that can never be loaded half-written.

Drop-in for torchtitan's ``CheckpointManager`` in our trainer (same ``save``,
``load``, ``maybe_wait_for_staging`` and ``close``), with what preemptible
clusters need on top:

- a checkpoint counts only once rank 0 has written its ``COMMITTED`` marker,
  which happens after the save finished on every rank (DCP gathers every
  rank's write results on rank 0 before its save returns);
- at most one save in flight; async saves run on their own gloo process group so
  they cannot deadlock with training collectives;
- the newest loadable checkpoint is resumed; interrupted or damaged ones are
  skipped with a warning naming them; a checkpoint that passes its integrity
  check but fails to load is an error, never a silent restart from scratch;
- local or shared filesystems and object stores (``s3://``) through fsspec;
- the last ``keep_latest_k`` committed checkpoints are kept (0 keeps all);
- every checkpoint records the torch / torchtitan / titan-moe versions that wrote
  it, and resuming one under other versions warns that the run continues but not
  bit-exactly (another torch draws, reduces and fuses differently).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torchtitan.components.checkpoint import ModelWrapper

from titan_moe.common import storage, versions
from titan_moe.checkpoint import catalog
from titan_moe.checkpoint.rng import RNGState
from titan_moe.checkpoint.settings import check_checkpoint_config

logger = logging.getLogger(__name__)

MODEL, RNG = "model", "rng"


class CheckpointLoadError(RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class CheckpointManager:
    def __init__(
        self,
        *,
        model_parts: list[torch.nn.Module],
        optimizers: Any,
        lr_schedulers: Any,
        dataloader: Any,
        train_state: Any,
        config: Any,
        base_folder: str,
    ) -> None:
        self.enable = bool(config.enable)
        folder = config.folder
        self.folder = folder if storage.is_url(folder) or folder.startswith("/") else storage.join(base_folder, folder)
        self.interval = config.interval
        self.keep_latest_k = config.keep_latest_k
        self.async_mode = config.async_mode.lower()
        self.load_step = config.load_step
        self.write_delay = getattr(config, "fault_injection_write_delay", 0.0)
        self.last_save_seconds = 0.0
        self.last_committed_step = -1  # every rank; the preemption path skips re-saving it
        check_checkpoint_config(config, cuda_available=torch.cuda.is_available())
        self.states: dict[str, Any] = {
            MODEL: ModelWrapper(model_parts),
            "optimizer": optimizers,
            "lr_scheduler": lr_schedulers,
            "dataloader": dataloader,
            "train_state": train_state,
            RNG: RNGState(),
        }
        self.states = {k: v for k, v in self.states.items() if v is not None}
        # Saves must not share a communicator with training: a save running in a
        # background thread would interleave its collectives with the step's.
        self.pg = dist.new_group(backend="gloo") if self.enable and dist.is_initialized() else None
        self._in_flight: tuple[int, Future, threading.Event] | None = None
        self._staging: Future | None = None
        self._stager = None

    # -- saving -------------------------------------------------------------------
    def save(self, curr_step: int, last_step: bool = False) -> None:
        """Save on the interval (async when configured) and always, synchronously, at the last step."""
        if not self.enable:
            return
        if last_step:
            self.save_now(curr_step)
        elif curr_step % self.interval == 0:
            self._save(curr_step, blocking=self.async_mode == "disabled")

    def save_now(self, step: int) -> None:
        """A synchronous save that is committed when this returns (preemption, end of run)."""
        if self.enable:
            self._save(step, blocking=True)

    def _flat_states(self) -> dict[str, Any]:
        # Model entries sit at the top level (torchtitan's layout), so a checkpoint's
        # model keys are the module's FQNs and eval can read them without the trainer.
        states = {k: v for k, v in self.states.items() if k != MODEL}
        states.update(self.states[MODEL].state_dict())
        return states

    def _save(self, step: int, blocking: bool) -> None:
        self.wait()  # at most one save in flight
        path = catalog.step_path(self.folder, step)
        begin = time.monotonic()
        self._clear_stale(step, path)
        writer = FsspecWriter(path, **storage.storage_options(path)) if storage.is_url(path) else FileSystemWriter(path)
        states = self._flat_states()
        committed = threading.Event()
        if blocking:
            dcp.save(states, storage_writer=writer, process_group=self.pg)
            self._commit(step, path, time.monotonic() - begin)
            committed.set()
            return
        if self.async_mode == "async_with_pinned_mem":
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
            from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

            self._stager = self._stager or DefaultStager(StagingOptions(True, True, True, True))
            response = dcp.async_save(
                states, storage_writer=writer, process_group=self.pg,
                async_checkpointer_type=AsyncCheckpointerType.PROCESS, async_stager=self._stager,
            )
            future, self._staging = response.upload_completion, response.staging_completion
        else:
            future = dcp.async_save(states, storage_writer=self._maybe_delayed(writer), process_group=self.pg)

        def on_done(f: Future) -> None:
            try:
                if f.exception() is None:
                    self._commit(step, path, time.monotonic() - begin)
                else:
                    logger.error("checkpoint step-%d failed and is not committed: %s", step, f.exception())
            finally:
                committed.set()

        future.add_done_callback(on_done)
        self._in_flight = (step, future, committed)
        logger.info("checkpoint step-%d: staged in %.2fs, writing in the background", step, time.monotonic() - begin)

    def _maybe_delayed(self, writer):
        """Fault injection for tests: hold the background write so a kill lands mid-save."""
        if self.write_delay <= 0:
            return writer
        write_data = writer.write_data

        def delayed_write_data(plan, planner):
            time.sleep(self.write_delay)
            return write_data(plan, planner)

        writer.write_data = delayed_write_data
        return writer

    def _clear_stale(self, step: int, path: str) -> None:
        """Remove leftovers of an interrupted save of the same step before writing it again."""
        if _rank() == 0:
            fs, p = storage.filesystem(path)
            if fs.exists(p):
                logger.warning("checkpoint %s exists from an interrupted run; replacing it", path)
                fs.rm(p, recursive=True)
        if self.pg is not None:
            dist.barrier(group=self.pg)

    def _commit(self, step: int, path: str, seconds: float) -> None:
        self.last_save_seconds = seconds
        self.last_committed_step = step
        if _rank() != 0:
            return
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        n_files = catalog.commit(path, step, world_size, seconds, versions=versions.runtime_versions())
        logger.info("checkpoint step-%d committed (%.2fs, %d files)", step, seconds, n_files)
        self._purge()

    def _purge(self) -> None:
        if self.keep_latest_k <= 0:
            return
        infos = catalog.list_checkpoints(self.folder)
        committed = [i for i in infos if i.committed]
        keep = {i.step for i in committed[-self.keep_latest_k:]}
        newest = max(keep, default=-1)
        for info in infos:
            # Older committed ones beyond K, and debris of saves that never committed.
            if info.step not in keep and info.step < newest:
                fs, p = storage.filesystem(info.path)
                fs.rm(p, recursive=True)

    def maybe_wait_for_staging(self) -> None:
        """Block until the in-flight save no longer reads the live tensors (before optimizer.step)."""
        if self._staging is not None:
            self._staging.result()
            self._staging = None

    def wait(self) -> None:
        """Block until the in-flight save is written and committed."""
        if self._in_flight is None:
            return
        step, future, committed = self._in_flight
        self._in_flight = None
        try:
            future.result()
        except Exception as exc:  # the step is simply not committed; the previous one stands
            logger.error("checkpoint step-%d was not saved: %s", step, exc)
        committed.wait()

    @property
    def save_in_flight(self) -> bool:
        return self._in_flight is not None and not self._in_flight[1].done()

    # -- loading ------------------------------------------------------------------
    def load(self, step: int = -1) -> bool:
        """Load ``step`` (or the newest loadable); False when there is nothing to resume."""
        if not self.enable:
            return False
        candidates = self._agreed_candidates(step)
        if not candidates:
            return False
        failures = []
        for path, ckpt_step, recorded in candidates:
            error = self._try_load(path)
            if error is None:
                logger.info("resumed from %s", path)
                if _rank() == 0:
                    warn_if_versions_differ(path, recorded)
                return True
            logger.warning("checkpoint %s could not be loaded (%s); trying the previous one", path, error)
            failures.append(f"{path}: {error}")
        raise CheckpointLoadError(
            "no checkpoint in %s could be loaded, refusing to restart from scratch:\n  %s" % (self.folder, "\n  ".join(failures))
        )

    def _agreed_candidates(self, step: int) -> list[tuple[str, int, dict[str, str]]]:
        """Rank 0 lists the folder and every rank uses its answer: (path, step, recorded versions), newest first."""
        candidates: list[tuple[str, int, dict[str, str]]] = []
        if _rank() == 0:
            infos = catalog.list_checkpoints(self.folder)
            for info in infos:
                if not info.loadable:
                    logger.warning("skipping checkpoint %s: %s", info.path, info.problem)
            loadable = [i for i in infos if i.loadable and (step < 0 or i.step == step)]
            if step >= 0 and not loadable:
                raise CheckpointLoadError(f"checkpoint.load_step {step}: no loadable step-{step} in {self.folder}")
            candidates = [(i.path, i.step, i.versions) for i in reversed(loadable)]
        if dist.is_initialized():
            box = [candidates]
            dist.broadcast_object_list(box, src=0, group=self.pg)
            candidates = box[0]
        return candidates

    def _try_load(self, path: str) -> str | None:
        reader = FsspecReader(path, **storage.storage_options(path)) if storage.is_url(path) else FileSystemReader(path)
        states = self._flat_states()
        error = None
        try:
            saved_keys = reader.read_metadata().state_dict_metadata.keys()
            if not any(k.startswith(f"{RNG}.{RNGState().key()}.") for k in saved_keys):
                states.pop(RNG)  # this rank did not exist when the checkpoint was written
            dcp.load(states, storage_reader=reader, process_group=self.pg)
            model_keys = set(self.states[MODEL].state_dict())
            self.states[MODEL].load_state_dict({k: v for k, v in states.items() if k in model_keys})
        except Exception as exc:  # noqa: BLE001 - every rank reports, then all agree below
            error = f"{type(exc).__name__}: {exc}"
        if dist.is_initialized():
            flag = torch.tensor([0 if error is None else 1])
            dist.all_reduce(flag, group=self.pg)
            if flag.item() and error is None:
                error = "another rank failed to load it"
        return error

    def close(self) -> None:
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None


def warn_if_versions_differ(path: str, recorded: dict[str, str]) -> bool:
    """Warn (and return True) when ``path`` was written under other library versions than this process's."""
    if not recorded:
        logger.info("checkpoint %s records no library versions (written before they were recorded)", path)
        return False
    changed = versions.differences(recorded, versions.runtime_versions())
    if changed:
        logger.warning(
            "checkpoint %s was written under other library versions (%s): training resumes from it, but "
            "bit-exact continuation is not promised across versions; compare runs only within one version",
            path, ", ".join(changed),
        )
    return bool(changed)
