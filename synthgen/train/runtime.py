"""The one training runtime: device, precision, compile mode, distributed processes, the step.

Every training loop in synthgen (CAS / supervised classification, pre-training, linear probe,
fine-tuning, k-NN feature extraction) gets its device, autocast dtype, gradient scaler, compiled
forward, channels-last choice and DDP wrapping from a :class:`Runtime`, and writes checkpoints with
:mod:`synthgen.train.checkpoint`; nothing else in ``synthgen.train`` resolves a device or sets a
precision. A loop body then reads like airbench's::

    rt = Runtime.create(device="auto", amp="auto", compile="off")
    model = rt.prepare(model)                   # moved, channels-last, DDP-wrapped, compiled
    for x, y in batches:
        with rt.autocast():
            loss = F.cross_entropy(model.forward(x).float(), y)
        rt.step(loss, optimizer)

Distributed: under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1 in the environment)
:meth:`Runtime.create` joins the process group (NCCL on CUDA, gloo on CPU), each process takes the
``cuda:LOCAL_RANK`` device, models are wrapped in DDP and :attr:`Runtime.is_main` (rank 0) is the only
process that writes checkpoints, logs and results.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn as nn

from synthgen.errors import SynthgenError

__all__ = [
    "Runtime",
    "PreparedModel",
    "resolve_device",
    "autocast_dtype",
    "compile_mode",
    "COMPILE_MODES",
    "AMP_CHOICES",
    "device_constant",
    "host_to_device",
]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when present (``cuda:LOCAL_RANK`` under torchrun), else CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SynthgenError(f"unknown device {device!r} (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SynthgenError(f"device {str(device)!r} asked for, but CUDA is not available")
    return dev


def autocast_dtype(amp: str | bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (auto/bf16/fp16/off, or True = auto, False = off) on ``device``."""
    if amp is True:
        amp = "auto"
    if amp is False or amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise SynthgenError(f"amp must be one of {', '.join(AMP_CHOICES)}; got {amp!r}")


def compile_mode(value: bool | str | None, device: torch.device | None = None) -> str | None:
    """A compile setting as a ``torch.compile`` mode on ``device``, or None for eager.

    ``auto``: reduce-overhead (CUDA graphs) on CUDA, eager elsewhere - a small network's step on a
    GPU is bound by kernel launches, which graphs replay; a CPU compile costs more than it saves.
    """
    if value is None or value is False or value == "off":
        return None
    if value == "auto":
        return "reduce-overhead" if device is not None and device.type == "cuda" else None
    if value is True:
        return "default"
    if value in COMPILE_MODES:
        return str(value)
    raise SynthgenError(f"compile must be auto, off, {', '.join(COMPILE_MODES)}; got {value!r}")


def host_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` (random draws or indices made on the CPU) on ``device``. To a GPU it goes pinned and
    asynchronously: a plain ``.to`` from pageable memory waits for every queued kernel first, which
    in a training loop stalls each step until the GPU has drained."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a first call under inference mode must not cache an inference tensor
        return torch.tensor(values, dtype=dtype).to(device)


def _hashable(values):
    if isinstance(values, (list, tuple)):
        return tuple(_hashable(v) for v in values)
    return float(values)


def device_constant(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.as_tensor(values, dtype=dtype, device=device)``, built once per (values, dtype, device):
    building a GPU tensor from Python numbers is a blocking host-to-device copy, which a loop doing it
    every batch pays as a device sync per step. Shared between callers: never modify it in place.
    A tensor ``values`` is passed through ``as_tensor``."""
    if isinstance(values, torch.Tensor):
        return torch.as_tensor(values, dtype=dtype, device=device)
    return _constant(_hashable(values), dtype, torch.device(device))


def _has_strided_convs(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in model.modules())


@dataclass
class PreparedModel:
    """A model as the runtime runs it.

    ``module`` is the plain model (parameters, state dict, evaluation); ``eager`` the same wrapped in
    DDP when distributed; ``compiled`` the compiled ``eager`` (or None). Calling it runs a training
    forward: the compiled graph for full batches of ``batch_size``, ``eager`` for the odd-sized last
    batch of an epoch (a compiled graph exists per shape; same parameters).
    """

    module: nn.Module
    eager: nn.Module
    compiled: nn.Module | None = None
    channels_last: bool = False
    graphs: bool = False
    batch_size: int | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None and (self.batch_size is None or x.shape[0] == self.batch_size):
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are consumed
            return self.compiled(x)
        return self.eager(x)


@dataclass
class Runtime:
    device: torch.device
    amp: str | bool = "auto"
    compile: str | bool | None = "off"
    channels_last: bool | None = None  # None: on CUDA for convolutional models
    rank: int = 0
    world_size: int = 1
    distributed: bool = False
    _scaler: Optional[torch.amp.GradScaler] = field(default=None, repr=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        device: str | torch.device | None = "auto",
        amp: str | bool = "auto",
        compile: str | bool | None = "off",
        channels_last: bool | None = None,
    ) -> "Runtime":
        """Resolve the device, check the precision and compile settings, join the process group
        when launched by torchrun / accelerate (``WORLD_SIZE`` > 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dev = resolve_device(device)
        autocast_dtype(amp, dev)  # validate early
        compile_mode(compile, dev)
        rank = 0
        if world > 1:
            import torch.distributed as dist

            if dev.type == "cuda" and (device is None or device == "auto" or dev.index is None):
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
            rank = dist.get_rank()
            world = dist.get_world_size()
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return cls(device=dev, amp=amp, compile=compile, channels_last=channels_last, rank=rank,
                   world_size=world, distributed=world > 1)

    # ---------------------------------------------------------------- precision
    @property
    def amp_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.amp, self.device)

    def autocast(self):
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler: active only for fp16 autocast (bf16 and fp32 need none)."""
        if self._scaler is None:
            self._scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        return self._scaler

    def reset_scaler(self) -> None:
        """Start a new training run at the initial fp16 loss scale. A runtime serves several runs
        (the CAS baseline and each scale, tuning trials, probes): a scale carried over from the run
        before would skip other steps, so a run's result would depend on what ran before it."""
        self._scaler = None

    # ---------------------------------------------------------------- the model and the step
    def uses_channels_last(self, model: nn.Module) -> bool:
        if self.channels_last is not None:
            return bool(self.channels_last) and self.device.type == "cuda"
        return self.device.type == "cuda" and _has_strided_convs(model)

    def prepare(self, model: nn.Module, *, batch_size: int | None = None, compile: bool = True) -> PreparedModel:
        """Move ``model`` to the device (channels-last where it pays), wrap it in DDP when distributed
        and compile it (``compile`` False: never, e.g. feature extraction). ``batch_size``: the full
        training batch; other sizes run the plain module (one compiled graph per shape)."""
        if self.distributed and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # one set of batch statistics per global batch
        model.to(self.device)
        cl = self.uses_channels_last(model)
        if cl:
            model.to(memory_format=torch.channels_last)
        eager: nn.Module = model
        if self.distributed and any(p.requires_grad for p in model.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            eager = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        mode = compile_mode(self.compile, self.device) if compile else None
        compiled = torch.compile(eager, mode=mode) if mode else None
        graphs = bool(mode in ("reduce-overhead", "max-autotune") and self.device.type == "cuda")
        return PreparedModel(model, eager, compiled, cl, graphs, batch_size)

    def step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        parameters: Iterable[torch.nn.Parameter] | None = None,
        grad_clip: float | None = None,
    ) -> None:
        """Backward, optional gradient-norm clipping (of the unscaled gradients), optimizer step."""
        optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            params = parameters if parameters is not None else [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        if x.device == self.device:
            return x
        return host_to_device(x, self.device)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------- distributed helpers
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the processes (``value`` itself when there is one)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.world_size

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return value
        import torch.distributed as dist

        out = value.detach().clone()
        dist.all_reduce(out)
        return out

    def shard(self, indices: torch.Tensor, *, every_row: bool = False) -> torch.Tensor:
        """This process's share of one global batch of row indices: contiguous, equal sizes (a
        training batch, whose size divides by the world size); ``every_row``: sizes differing by at
        most one, so the processes together take every row once (scoring)."""
        if not self.distributed:
            return indices
        if every_row:
            return torch.tensor_split(indices, self.world_size)[self.rank]
        n = indices.shape[0] // self.world_size
        return indices[self.rank * n : (self.rank + 1) * n]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # ---------------------------------------------------------------- reporting
    def describe(self) -> str:
        if self.device.type == "cuda":
            name = f"cuda ({torch.cuda.get_device_name(self.device)})"
        else:
            name = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        if self.distributed:
            name += f" x{self.world_size} processes"
        return name

    def settings(self) -> dict:
        dtype = self.amp_dtype
        return {
            "device": str(self.device),
            "amp": str(dtype).replace("torch.", "") if dtype else "fp32",
            "compile": compile_mode(self.compile, self.device),
            "world_size": self.world_size,
        }
