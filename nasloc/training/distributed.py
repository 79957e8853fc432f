"""Devices and process groups: the device a process trains on, torchrun/DDP, AMP's dtype."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import NaslocError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the process group torchrun describes (env WORLD_SIZE > 1); a no-op for a single process.

    nccl on CUDA, gloo on CPU. Safe to call again: an initialised group is reused.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    return DistInfo()


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class DeviceError(NaslocError):
    """A device asked for that this machine does not have; the message is one line."""


def resolve_device(device: str = "auto") -> torch.device:
    """"auto": this process's CUDA device (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: CUDA is not available on this machine; use --device cpu (or auto)")
        if device == "cuda":
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return torch.device(device)


def amp_dtype(amp: bool | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None (fp32) unless on CUDA (amp=None) or asked; bf16 where the GPU has it, else fp16
    (which needs a GradScaler)."""
    if not (device.type == "cuda" if amp is None else amp):
        return None
    if device.type != "cuda":
        raise ValueError(f"amp=True needs a CUDA device, got {device}; leave amp=None (auto) on CPU")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def wrap_ddp(model: nn.Module, dev: torch.device) -> nn.Module:
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel or timm ModelEma wrapper (its ``.module``), else ``model``."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
