"""Stage 3: fine-tune the UNet with a trained class encoder held fixed.

``finetune_unet(run_dir, encoder_epoch=k)`` trains the base UNet on the run's cached latents,
conditioned on encoder epoch ``k``'s class tokens (computed once: the encoder is fixed, so each class
has one embedding), with the same loss, optimizer and schedule as stage 1 and Lomurno et al.'s
stage-3 defaults. ``method: full`` trains every UNet weight and checkpoints the whole UNet each
epoch; ``method: lora`` trains LoRA adapters (peft) on the attention projections and checkpoints
only them (``adapter_model.safetensors`` + ``adapter_config.json``), a fraction of the size.
Checkpoints go to ``run_dir/unet/epoch-NNNN/``; a rerun resumes after the last finished epoch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

from synthgen.classcond.base import load_base_components
from synthgen.classcond.checkpoints import epoch_dir, load_module_weights, require_epoch
from synthgen.classcond.config import UNetStageConfig, validate_config
from synthgen.classcond.data import run_latents
from synthgen.classcond.encoder import load_class_encoder
from synthgen.classcond.loop import DenoisingTask, EpochInfo, StageResult, run_stage
from synthgen.classcond.runfolder import RunFolder
from synthgen.classcond.train_encoder import ENCODER_STAGE
from synthgen.errors import SynthgenError

__all__ = ["finetune_unet", "UNET_STAGE", "ADAPTER_WEIGHTS", "add_lora", "load_unet_epoch"]

UNET_STAGE = "unet"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def add_lora(unet, rank: int, alpha: Optional[float], targets, seed: int) -> None:
    """Attach fresh LoRA adapters to ``unet``'s ``targets``, drawn from ``seed`` (peft draws them from
    torch's global generator); only they remain trainable."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise SynthgenError("method: lora needs peft (pip install peft)") from None
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                    target_modules=list(targets)))


def _save_lora(unet, folder: Path) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(weights, folder / ADAPTER_WEIGHTS)
    unet.peft_config["default"].save_pretrained(folder)


def _load_lora(unet, folder: Path) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(unet, load_file(folder / ADAPTER_WEIGHTS))
    if getattr(result, "unexpected_keys", None):
        raise SynthgenError(f"the LoRA weights in {folder} do not fit the UNet")


def load_unet_epoch(unet, folder: Path) -> None:
    """Put a stage-3 checkpoint's weights into the base ``unet``: the whole UNet, or LoRA adapters
    merged into its weights (the result is a plain UNet)."""
    if (folder / ADAPTER_WEIGHTS).is_file():
        from peft import LoraConfig

        unet.add_adapter(LoraConfig.from_pretrained(str(folder)))
        _load_lora(unet, folder)
        unet.fuse_lora()
        unet.unload_lora()
    else:
        load_module_weights(unet, folder)


def finetune_unet(
    run_dir: str | os.PathLike,
    *,
    encoder_epoch: Optional[int] = None,
    config: UNetStageConfig | dict | None = None,
    on_step_end: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    on_epoch_end: Optional[Callable[[EpochInfo], None]] = None,
) -> StageResult:
    """Fine-tune the UNet of the run in ``run_dir`` with encoder epoch ``encoder_epoch`` (None: the
    last) fixed. SynthgenError when that epoch does not exist, or when the folder's UNet stage was
    started with another encoder epoch or other settings."""
    config = validate_config(UNetStageConfig, config)
    run = RunFolder(Path(run_dir))
    info = run.read_info()
    if config.resolution is not None and config.resolution != info["resolution"]:
        raise SynthgenError(
            f"resolution {config.resolution} differs from the run's ({info['resolution']} px, the encoder's); "
            "leave it unset"
        )
    encoder_epoch = require_epoch(run.stage_dir(ENCODER_STAGE), encoder_epoch, "encoder")
    encoder = load_class_encoder(epoch_dir(run.stage_dir(ENCODER_STAGE), encoder_epoch))
    with torch.no_grad():  # one embedding per class: the encoder is fixed
        table = encoder(torch.eye(encoder.config.num_classes)).float()
    base = load_base_components(info["base_model"], revision=info["base_revision"])
    latents = run_latents(run, info, base.folder, encode_batch_size=config.encode_batch_size, cpu=config.cpu)

    unet = base.unet
    if config.method == "lora":
        add_lora(unet, config.lora_rank, config.lora_alpha, config.lora_targets, config.seed)
        save_weights, load_weights = _save_lora, _load_lora
    else:
        unet.requires_grad_(True)
        save_weights = lambda model, folder: model.save_pretrained(folder, safe_serialization=True)  # noqa: E731
        load_weights = load_module_weights
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    tables: dict[torch.device, torch.Tensor] = {}

    def condition(model, labels: torch.Tensor) -> torch.Tensor:
        if labels.device not in tables:
            tables[labels.device] = table.to(labels.device)
        return tables[labels.device][labels]

    task = DenoisingTask(
        name=UNET_STAGE,
        trainable=unet,
        unet=unet,
        condition=condition,
        save_weights=save_weights,
        load_weights=load_weights,
        settings={"stage": UNET_STAGE, "config": config.resume_key(), "encoder_epoch": encoder_epoch},
        trains_unet=True,
    )
    return run_stage(task, config, latents, base.noise_scheduler, run.stage_dir(UNET_STAGE),
                     on_step_end=on_step_end, on_epoch_end=on_epoch_end)
