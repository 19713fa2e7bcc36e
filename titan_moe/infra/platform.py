"""torchtitan on CPU: the one adapter that lets torchtitan 0.2.2 train without a GPU.

torchtitan 0.2.2 decides its device once, when ``torchtitan.tools.utils`` is
imported, and many of its modules copy ``device_type``/``device_module`` into
their own namespace at import time (``from torchtitan.tools.utils import
device_type``).  On a machine without an accelerator it falls back to
``"cuda"`` and fails.  This module is the *only* place in titan-moe that knows
about that; everything else is device-agnostic.

Use it before anything imports torchtitan::

    from titan_moe.infra import platform
    platform.activate()          # no-op when CUDA is available

and, after FSDP wrapping, ``platform.adapt_fsdp(model)`` (a no-op unless the
CPU adapter is active).  The GPU path never enters ``_activate_cpu``.

Also required on CPU, but handled by the model rather than here (the
README's MoE section): SDPA attention (FlexAttention has no CPU
backward), ``bincount`` instead of ``histc`` on integer tensors, and a torch
(not triton) token permutation for expert parallel (``expert_parallel.py``).
"""

from __future__ import annotations

import os
import resource
import sys
from types import SimpleNamespace
from collections.abc import Callable
from typing import Any

import torch

_CPU_ACTIVE = False


class _CpuDeviceModule:
    """The handful of ``torch.cuda``-style calls torchtitan's Trainer makes, for CPU.

    Anything not defined here is looked up on ``torch.cpu`` (``synchronize``,
    ``Stream``, ...), so the object can stand in for a device module.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)  # torch.cpu already has synchronize/set_device/device_count

    @staticmethod
    def is_available() -> bool:
        return True  # the CPU is always there

    @staticmethod
    def current_device() -> int:
        return 0  # torch.cpu.current_device() returns the string "cpu"; torchtitan passes it to barrier(device_ids=[...]) which wants an int

    @staticmethod
    def set_device(device: Any) -> None:
        return None  # there is one CPU device; torchtitan calls set_device(cpu:LOCAL_RANK) before init_process_group

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"  # DeviceMemoryMonitor logs it and get_peak_flops() looks it up (falls back to a nominal peak)

    @staticmethod
    def get_device_properties(device: Any = None) -> SimpleNamespace:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # DeviceMemoryMonitor divides by total_memory
        return SimpleNamespace(total_memory=total, name="cpu")

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no allocator on CPU: report the process's peak RSS (KiB on Linux)
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak}  # the two keys DeviceMemoryMonitor reads; others default to -1

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None  # nothing to reset without a caching allocator

    @staticmethod
    def empty_cache() -> None:
        return None  # the CPU allocator has no cache to empty


CPU_DEVICE_MODULE = _CpuDeviceModule()


def needs_cpu_adapter() -> bool:
    """True when no CUDA device is usable, i.e. torchtitan would pick a missing 'cuda'."""
    return not torch.cuda.is_available()


def cpu_active() -> bool:
    """Whether ``activate()`` switched torchtitan to CPU in this process."""
    return _CPU_ACTIVE


def activate() -> str:
    """Point torchtitan at CPU when there is no GPU; return the device type in use.

    Must run before the first ``import torchtitan`` in the process (the
    entry points ``titan_moe.train`` and ``titan_moe.bench_baseline`` do it first thing).
    """
    if not needs_cpu_adapter():
        return "cuda"
    _activate_cpu()
    return "cpu"


def _activate_cpu() -> None:
    global _CPU_ACTIVE
    if _CPU_ACTIVE:
        return
    if "torchtitan.tools.utils" in sys.modules:
        # Too late: other torchtitan modules have already copied device_type="cuda".
        if sys.modules["torchtitan.tools.utils"].device_type != "cpu":
            raise RuntimeError(
                "titan_moe.infra.platform.activate() must run before torchtitan is imported "
                "(import titan_moe.train or call activate() at the top of your entry point)"
            )
    import torch._utils as torch_utils

    original = (torch_utils._get_available_device_type, torch_utils._get_device_module)

    def _device_type() -> str:
        return "cpu"  # what torchtitan.tools.utils.get_device_info() asks for at import time

    def _device_module(device_type: str | None = None) -> Any:
        if device_type in (None, "cpu"):
            return CPU_DEVICE_MODULE  # torch.cpu lacks current_device()->int and memory stats; give the stub
        return original[1](device_type)  # any other device keeps torch's answer

    torch_utils._get_available_device_type = _device_type  # torchtitan copies this name when tools.utils is imported
    torch_utils._get_device_module = _device_module  # same: so device_module becomes the CPU stub
    try:
        import torchtitan.tools.utils as tt_utils  # runs get_device_info() with the CPU answers above
    finally:
        torch_utils._get_available_device_type, torch_utils._get_device_module = original  # leave torch itself untouched

    tt_utils.device_type = "cpu"  # for code that reads the attribute at call time (Trainer.__init__)
    tt_utils.device_module = CPU_DEVICE_MODULE  # same, for device_module.set_device(...) in Trainer.__init__
    _CPU_ACTIVE = True


def adapt_fsdp(model: torch.nn.Module) -> None:
    """After ``fully_shard``: make FSDP use plain SUM reductions under gloo.

    titan-moe (like torchtitan 0.2.2) disables FSDP's gradient division and
    normalises by the global token count instead; FSDP then asks for a
    ``PREMUL_SUM`` reduce-scatter, which gloo does not implement.  Forcing
    SUM gives the same numbers because the divide factor is 1.
    """
    if not _CPU_ACTIVE:
        return  # GPU/NCCL supports PREMUL_SUM; nothing to adapt
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)  # gloo lacks ReduceOp.PREMUL_SUM


def adapt_init(model_parts: list[torch.nn.Module], build_full_model: Callable[[], torch.nn.Module]) -> None:
    """After the Trainer's init: on CPU, re-initialise from one seeded, unsharded model.

    DTensor's random ops are layout-independent only on CUDA-like devices (its
    offset-based RNG tracker needs ``set_rng_state`` on the device module); on CPU
    each rank draws its shard from its own generator, so every rank's shard comes
    out identical and the init depends on the FSDP/EP layout.  Here every
    (possibly sharded) parameter is overwritten with its slice of the full model,
    so a seed gives the same initial weights for any DP/EP layout.
    """
    if not _CPU_ACTIVE:
        return  # CUDA: DTensor's RNG tracker already makes init layout-independent
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = {_plain_name(name): p for name, p in build_full_model().named_parameters()}
    with torch.no_grad():
        for part in model_parts:
            for name, param in part.named_parameters():
                source = full[_plain_name(name)]
                if isinstance(param, DTensor):
                    # Every rank holds the same full tensor: slice locally, no communication.
                    shard = distribute_tensor(source, param.device_mesh, param.placements, src_data_rank=None)
                    param.to_local().copy_(shard.to_local())
                else:
                    param.copy_(source)


def _plain_name(name: str) -> str:
    # Wrappers inserted by activation checkpointing and torch.compile.
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


class _TorchWithIntegerHistc:
    """``torch`` as seen by torchtitan's MoE module, with a histc that accepts integer input."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)  # everything else is plain torch

    @staticmethod
    def histc(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if input.is_floating_point():
            return torch.histc(input, *args, **kwargs)
        # CPU histc has no integer kernel: count in float32 (exact for expert ids) and
        # return the input's dtype, as CUDA's integer histc does.
        return torch.histc(input.float(), *args, **kwargs).to(input.dtype)


def adapt_torchtitan_moe() -> None:
    """Let torchtitan's own MoE (the benchmark baseline) run on CPU; a no-op on GPU.

    Its router and token reorderer count tokens per expert with ``torch.histc`` on
    integer expert ids, which only CUDA implements.
    """
    if not _CPU_ACTIVE:
        return  # CUDA has an integer histc
    from torchtitan.models.moe import moe as torchtitan_moe

    torchtitan_moe.torch = _TorchWithIntegerHistc()  # the module looks up torch.histc at call time
