"""How much memory a stage may use, checked before the work: a plan that does not fit stops
with one line (what it needs, what there is, what to change), not the kernel's OOM killer."""

from __future__ import annotations

from pathlib import Path

from stages.common.config import StageError

GIB = 2**30


def available_bytes(device: str = "cpu") -> int | None:
    """Free memory on `device`: the GPU's free memory, or the kernel's MemAvailable (what can
    be allocated without swapping); None where the platform does not say (then nothing is
    checked)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def held_bytes(device: str = "cpu") -> int:
    """What this process holds on `device` now: the GPU memory torch reserved, or the resident
    set size."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.memory_reserved()
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def require(
    stage: str, need: int, parts: dict[str, int], device: str, advice: str, already_used: int = 0
) -> None:
    """Stop `stage` when `need` bytes (broken down in `parts`) exceed what `device` has free
    plus `already_used` (memory the plan counts that the process holds already)."""
    free = available_bytes(device)
    if free is None or need <= free + already_used:
        return
    breakdown = ", ".join(f"{name} {size / GIB:.1f}" for name, size in parts.items())
    raise StageError(
        f"{stage} needs ~{need / GIB:.1f} GiB on {device} ({breakdown}) but "
        f"{(free + already_used) / GIB:.1f} GiB is available; {advice}"
    )
