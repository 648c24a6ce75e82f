"""The ground floor every stage stands on: which device, one rank of a torchrun job (and whether a
module is sharded across the ranks), bf16 autocast, reductions over ranks, and the device's peak
FLOP/s and memory (for MFU and run plans)."""

from __future__ import annotations

import contextlib
import gc
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from chatforge.errors import ChatforgeError


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun) and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def single_process(device: torch.device) -> Dist:
    """The Dist of a run outside torchrun."""
    return Dist(0, 1, 0, device)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ChatforgeError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ChatforgeError("device 'mps' asked for, but MPS is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ChatforgeError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None


def setup_distributed(device_name: str = "auto") -> Dist:
    """Single process, or one rank of a torchrun job (env RANK/WORLD_SIZE/LOCAL_RANK set by torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return single_process(pick_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device)


def wait_for_all_ranks() -> None:
    """Every rank reaches this before any leaves: a rank that tears its process group down while
    another still saves or syncs can abort the job at exit (gloo, seen with FSDP2)."""
    if tdist.is_initialized():
        tdist.barrier()


def cleanup_distributed() -> None:
    """Tear the process group down, after collecting what still holds its work: a sharded model's
    pending collectives freed later, while Python shuts down, can abort a finished gloo job."""
    if tdist.is_initialized():
        gc.collect()
        tdist.destroy_process_group()


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP2 sharded this module (or one inside it): its forward then needs every rank."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def all_reduce_max(n: int, dist: Dist) -> int:
    """The largest of an integer over the ranks."""
    if dist.world_size == 1:
        return n
    t = torch.tensor(n, device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t)


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.world_size > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = re.search(r"^flags\s*:(.*)$", info, flags=re.M)
    return set(line.group(1).split()) if line else set()


def cpu_name() -> str:
    """The CPU as a report names it: /proc/cpuinfo's model name, logical cores, the widest vector unit and
    native bf16 (what decides CPU training speed), e.g. "AMD EPYC, 2 cores, AVX-512, native bf16"."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, flags=re.M)
    flags = cpu_flags()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    name = model.group(1).strip() if model else "unknown CPU"
    return f"{name}, {os.cpu_count()} cores, {vector}, {bf16}" if flags else f"{name}, {os.cpu_count()} cores"


def machine() -> dict:
    """What a timing ran on, for reports: the CPU, torch's threads and the GPU where there is one."""
    out = {"cpu": cpu_name(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX: bf16 matmuls at about twice fp32's speed (without them oneDNN emulates, slower)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def autocast(device: torch.device, precision: str = "auto"):
    """The training and evaluation dtype. "auto": bf16 autocast on CUDA, fp32 elsewhere; "bf16": bf16
    autocast on any device (on a CPU only with native bf16); "fp32": no autocast."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ChatforgeError(f"unknown precision {precision!r}; choose auto, bf16 or fp32")
    if device.type == "cuda" and precision != "fp32":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and precision == "bf16":
        if not cpu_has_native_bf16():
            raise ChatforgeError(
                "precision bf16 on this CPU would be emulated and slower (no avx512_bf16 or amx_bf16 in "
                "/proc/cpuinfo); use precision=fp32"
            )
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
    "3090": 71e12,
}


# memory as torch reports it (total_memory, GiB) for the usual variant of each card; plans must fit in it
GPU_MEMORY_GIB = {
    "H200": 139.8,
    "H100": 79.1,
    "A100": 79.1,
    "L40S": 44.4,
    "L4": 22.0,
    "A10": 22.0,
    "4090": 23.6,
    "3090": 23.6,
}


def peak_flops(device: torch.device) -> tuple[float, str]:
    """The device's peak FLOP/s for the dtype we train in, and how it was found."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"{name} (bf16 dense)"
        return 0.0, f"{name} (peak FLOPs unknown, so no MFU; bench/train_throughput.py takes --peak-flops)"
    if device.type == "cpu":
        # fp32 FMA throughput: threads x GHz x (lanes x 2 flops x 2 FMA units)
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        mhz = re.findall(r"cpu MHz\s*:\s*([\d.]+)", info)
        ghz = float(mhz[0]) / 1000 if mhz else 2.5
        flags = cpu_flags()
        per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8
        threads = torch.get_num_threads()
        return (
            threads * ghz * 1e9 * per_cycle,
            f"CPU {threads} threads x {ghz:.2f} GHz x {per_cycle} fp32 flops/cycle",
        )
    return 0.0, f"{device.type} (unknown peak)"
