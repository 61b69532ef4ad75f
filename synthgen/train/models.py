"""Models by name (a small timm-style registry).

- ``resnet20``: the CIFAR ResNet-20 of He et al. (2016, sec. 4.2), 3 stages of 3 basic blocks with
  16/32/64 channels, ~0.27M parameters with 10 classes; the CAS classifier of Lomurno et al.
  ``shortcut="A"`` (default, as in the paper's CIFAR experiments): parameter-free shortcuts,
  stride-2 subsampling plus zero-padded channels where the shape changes (269,722 parameters for 10
  classes). ``shortcut="B"``: 1x1 conv + BN projections there (as in the Keras ResNet20 v1 example;
  272,474 parameters). Also ``resnet32``/``resnet44``/``resnet56``.
- ``resnet20_w64``: the ResNet-20 that Lomurno et al.'s published code actually trains for CAS
  (``initial_filters=64``: 64/128/256 channels, 3x3 max-pool shortcuts with zero channels
  appended); 4.29M parameters, ~16x the FLOPs of ``resnet20``. Their 83.26% CIFAR-10 baseline
  comes from this width; the 0.27M ``resnet20`` tops out far lower without augmentation.
- ``resnet50``, ``vit_tiny``, ``vit_small``, ``vit_base``: timm models created WITHOUT pretrained
  weights unless ``pretrained=True``; the ViTs take any ``img_size``/``patch_size`` (patch default:
  16 for images of 96 px and up, else 4, e.g. 8x8 tokens at 32 px).
- ``timm:<name>``: any timm model, kwargs passed through.

``num_classes=0`` gives a feature extractor. Every model created here has ``.num_features`` and a
``forward_features_pooled(x) -> [B, num_features]`` method; :func:`extract_features` works on any
timm model as well.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from synthgen.errors import SynthgenError

__all__ = ["create_model", "list_models", "register_model", "extract_features", "count_parameters", "CifarResNet", "keras_init_"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Registered names; any timm model is also available as ``timm:<name>``."""
    return sorted(_REGISTRY)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al. 2016, section 4.2)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_kind = shortcut
        self.stride = stride
        self.pad = planes - in_planes
        self.proj: nn.Module | None = None
        if (stride != 1 or in_planes != planes) and shortcut == "B":
            self.proj = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            return self.proj(x)
        if self.shortcut_kind == "maxpool":
            # Lomurno et al.'s Keras code: 3x3 max-pool with the block's stride, zero channels appended
            if self.stride != 1:
                x = F.max_pool2d(x, 3, self.stride, padding=1)
            return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (works at any size: global average pooling)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: str = "A", widths=(16, 32, 64), in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise SynthgenError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B", "maxpool"):
            raise SynthgenError(f"shortcut must be 'A', 'B' or 'maxpool', got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        in_planes = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(in_planes, w, 2 if (i > 0 and j == 0) else 1, shortcut))
                in_planes = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.num_features = widths[-1]
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_features_pooled(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features_pooled(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def _keras_variance_scaling_(weight: torch.Tensor, scale: float, mode: str) -> None:
    """Keras' VarianceScaling(distribution="truncated_normal"): a normal cut at 2 standard deviations,
    its std raised by 1/0.8796 so the cut distribution keeps the variance ``scale / fan``."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)  # same fans as Keras' (kh, kw, in, out)
    fan = fan_in if mode == "fan_in" else (fan_in + fan_out) / 2
    std = (scale / fan) ** 0.5 / 0.87962566103423978
    nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


@torch.no_grad()
def keras_init_(model: nn.Module) -> nn.Module:
    """Re-initialise ``model`` as Lomurno et al.'s Keras ResNet-20 is (Models/ImageClassifiers/resnet.py):
    convolutions HeNormal, the Dense output layer GlorotNormal (both truncated normals), every bias
    zero (Keras' default bias initialiser; torch draws Linear biases uniformly), BatchNorm gamma 1,
    beta 0. Applied to any model, it gives conv/linear layers those initialisers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            _keras_variance_scaling_(m.weight, 2.0, "fan_in")
        elif isinstance(m, nn.Linear):
            _keras_variance_scaling_(m.weight, 1.0, "fan_avg")
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


def _cifar_resnet(name: str, depth: int, **defaults):
    def make(num_classes: int, *, image_size: int = 32, pretrained: bool = False, **kwargs):
        if pretrained:
            raise SynthgenError(f"{name} has no pretrained weights")
        return CifarResNet(depth, num_classes, **{**defaults, **kwargs})

    return register_model(name)(make)


for _d in (20, 32, 44, 56, 110):
    _cifar_resnet(f"resnet{_d}", _d)

# The ResNet-20 of Lomurno et al.'s published CAS code (initial_filters=64): 4,291,530 Keras
# parameters for 10 classes, BN statistics included.
_cifar_resnet("resnet20_w64", 20, widths=(64, 128, 256), shortcut="maxpool")


# --------------------------------------------------------------------------------------------------
# timm models


def _pooled_timm(self, x: torch.Tensor) -> torch.Tensor:
    return self.forward_head(self.forward_features(x), pre_logits=True)


def extract_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features ``[B, num_features]`` of any model made here or by timm."""
    fn = getattr(model, "forward_features_pooled", None)
    if fn is not None:
        return fn(x)
    if hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    raise SynthgenError(f"{type(model).__name__} has no pooled feature extractor")


def _timm(name: str, num_classes: int, pretrained: bool, **kwargs) -> nn.Module:
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:  # unknown model
        raise SynthgenError(f"timm cannot create {name!r}: {' '.join(str(exc).split())}") from None
    except Exception as exc:  # pretrained weights unreachable offline, bad kwargs, ...
        raise SynthgenError(f"timm cannot create {name!r}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    if not hasattr(model, "forward_features_pooled"):
        model.forward_features_pooled = types.MethodType(_pooled_timm, model)
    return model


@register_model("resnet50")
def _resnet50(num_classes: int, *, image_size: int = 224, pretrained: bool = False, **kwargs):
    return _timm("resnet50", num_classes, pretrained, **kwargs)


def _vit(timm_name: str):
    def make(num_classes: int, *, image_size: int = 224, pretrained: bool = False, patch_size: int | None = None, **kwargs):
        if patch_size is None:
            patch_size = 16 if image_size >= 96 else 4
        if image_size % patch_size:
            raise SynthgenError(f"image size {image_size} is not a multiple of patch size {patch_size}")
        kwargs.setdefault("img_size", image_size)
        kwargs.setdefault("patch_size", patch_size)
        if pretrained and (kwargs["img_size"] != 224 or kwargs["patch_size"] != 16):
            kwargs.setdefault("pretrained_strict", False)
        return _timm(timm_name, num_classes, pretrained, **kwargs)

    return make


register_model("vit_tiny")(_vit("vit_tiny_patch16_224"))
register_model("vit_small")(_vit("vit_small_patch16_224"))
register_model("vit_base")(_vit("vit_base_patch16_224"))


def create_model(name: str, num_classes: int, *, image_size: int = 32, pretrained: bool = False, **kwargs) -> nn.Module:
    """Create ``name`` (see :func:`list_models`, or ``timm:<name>``) with ``num_classes`` outputs
    (``0``: a feature extractor). Weights are random unless ``pretrained=True``."""
    if name.startswith("timm:"):
        timm_name = name[len("timm:") :]
        model = _timm(timm_name, num_classes, pretrained, **kwargs)
    else:
        fn = _REGISTRY.get(name)
        if fn is None:
            raise SynthgenError(f"unknown model {name!r}; known: {', '.join(list_models())}, or timm:<name>")
        model = fn(num_classes, image_size=image_size, pretrained=pretrained, **kwargs)
    if not hasattr(model, "num_features"):  # pragma: no cover - every timm model has it
        raise SynthgenError(f"model {name!r} does not expose num_features")
    return model
