"""Load a diffusers text-to-image pipeline for a :class:`~synthgen.recipe.GeneratorConfig`.

``cfg.model`` is one of

* ``builtin:NAME`` -- a model synthgen builds from configs (``builtin:tiny-sd``, see ``tiny.py``);
* a local folder holding a diffusers pipeline (``model_index.json``);
* a Hugging Face Hub id (``stabilityai/stable-diffusion-2-1-base``) with an optional ``revision``.

The loaded pipeline comes back with everything the dataset's provenance needs: the resolved model
revision (the Hub commit hash; a content fingerprint for builtin and local models), the scheduler,
the device and dtype, and the library versions.

Any failure the user can fix (unknown model, offline, missing folder, bad device) is raised as a
:class:`SynthgenError` with one line; nothing is downloaded when ``HF_HUB_OFFLINE=1`` is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from synthgen.errors import ModelNotFoundError, SynthgenError
from synthgen.provenance import library_versions
from synthgen.paths import cache_dir
from synthgen.recipe import GeneratorConfig

logger = logging.getLogger(__name__)

#: recipe scheduler name -> diffusers class name
SCHEDULER_CLASSES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpm_solver_multistep": "DPMSolverMultistepScheduler",
    "dpm_solver_singlestep": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}

_TRUTHY = {"1", "true", "yes", "on"}
#: set to 1 to let a model without safetensors weights load its pickle (.bin) files
ALLOW_PICKLE_ENV = "SYNTHGEN_ALLOW_PICKLE_WEIGHTS"


def pickle_weights_allowed() -> bool:
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in _TRUTHY


def _dtype_kwarg() -> str:
    """``dtype`` on diffusers that renamed it (torch_dtype is deprecated there), else torch_dtype."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"



@dataclass
class LoadedPipeline:
    """A ready-to-run pipeline plus the facts that decide (and record) its images."""

    pipe: Any  # a diffusers DiffusionPipeline (StableDiffusionPipeline for SD 1.x/2.x and tiny-sd)
    device: str  # "cpu", "cuda", "cuda:1", "mps"
    dtype: Any  # torch.dtype
    model: str  # cfg.model as given
    model_revision: str  # Hub commit hash, or "sha256:<fingerprint>" for builtin/local models
    scheduler_name: str  # the recipe name (ddim, ...) or the pipeline's own class name when kept
    scheduler_class: str  # diffusers class name, e.g. "DDIMScheduler"
    pipeline_class: str  # e.g. "StableDiffusionPipeline"
    versions: dict[str, str] = field(default_factory=dict)  # torch, diffusers, transformers, ...
    compiled: bool = False
    attention: str = "sdpa"  # "sdpa" (PyTorch scaled_dot_product_attention), "xformers", "sliced"
    # the GPU path's settings as applied (accel.py): resolved values, not "auto"
    fused_qkv: bool = False
    channels_last: bool = False
    compiled_modules: list[str] = field(default_factory=list)  # "unet", "vae.decoder"
    step_cache_interval: int = 1
    vae_decode_chunk: Any = "auto"
    prompt_cache: int = 0
    # a class-conditioned pipeline's classes and checkpoint epochs (generate/classcond.py); {} otherwise
    conditioning: dict[str, Any] = field(default_factory=dict)

    @property
    def safety_checker(self) -> bool:
        """Whether the pipeline's safety checker runs on (and may reject) every image, as applied:
        false for ``generator.safety_checker: false`` and for pipelines that have none."""
        return getattr(self.pipe, "safety_checker", None) is not None

    def provenance(self) -> dict[str, Any]:
        """Plain data for the build manifest."""
        record = {
            "model": self.model,
            "model_revision": self.model_revision,
            "pipeline_class": self.pipeline_class,
            "scheduler": self.scheduler_name,
            "scheduler_class": self.scheduler_class,
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "attention": self.attention,
            "compiled": self.compiled,
            "compiled_modules": list(self.compiled_modules),
            "fused_qkv": self.fused_qkv,
            "channels_last": self.channels_last,
            "step_cache_interval": self.step_cache_interval,
            "vae_decode_chunk": self.vae_decode_chunk,
            "prompt_cache": self.prompt_cache,
            "safety_checker": self.safety_checker,
            "classifier_free_guidance": "batched (one UNet call per step)",
            "versions": dict(self.versions),
        }
        if self.conditioning:
            record["class_conditioning"] = dict(self.conditioning)
        return record


# --------------------------------------------------------------------------------------------------
# device / dtype
# --------------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> str:
    """``auto`` -> cuda if available, else mps, else cpu; an explicit device must be available."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    kind = name.split(":", 1)[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SynthgenError(f"device {name!r} requested but CUDA is not available (use device: auto or cpu)")
        if ":" in name:
            try:
                idx = int(name.split(":", 1)[1])
            except ValueError:
                raise SynthgenError(f"bad device {name!r}; expected cuda:N") from None
            if not 0 <= idx < torch.cuda.device_count():
                raise SynthgenError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return name
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise SynthgenError("device 'mps' requested but MPS is not available (use device: auto or cpu)")
        return "mps"
    if name == "cpu":
        return "cpu"
    raise SynthgenError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(name: str, device: str):
    """``auto`` -> bfloat16 on CUDA (float16 on cards without bfloat16), float32 elsewhere.

    bfloat16 runs at float16's tensor-core rate and has float32's range, so an activation that
    overflows float16 (a NaN image, regenerated at a cost) cannot happen; benchmarks/bench_sd.py
    records its pixel effect against float16 and float32.
    """
    import torch

    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# --------------------------------------------------------------------------------------------------
# schedulers
# --------------------------------------------------------------------------------------------------
def scheduler_class(name: str):
    """The diffusers scheduler class for a recipe scheduler name."""
    import diffusers

    if name not in SCHEDULER_CLASSES:
        raise SynthgenError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_CLASSES)}")
    return getattr(diffusers, SCHEDULER_CLASSES[name])


def make_scheduler(name: str, config: Any):
    """Build scheduler ``name`` from another scheduler's config (betas, timestep spacing, ...)."""
    cls = scheduler_class(name)
    overrides: dict[str, Any] = {}
    if name == "pndm" and "skip_prk_steps" not in config:
        # PLMS, as Stable Diffusion ships it; PNDM's own default (Runge-Kutta warm-up steps) breaks
        # on few inference steps and is not what "pndm" means for SD checkpoints.
        overrides["skip_prk_steps"] = True
    try:
        return cls.from_config(config, **overrides)
    except ImportError as exc:  # e.g. lms needs scipy; diffusers gives a dummy class without it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SynthgenError(f"scheduler {name!r} cannot be used here: {first} (pip install scipy)") from None


def set_scheduler(pipe: Any, name: Optional[str]) -> str:
    """Swap the pipeline's scheduler for ``name`` (None keeps it); returns the scheduler's name."""
    if name is None:
        return type(pipe.scheduler).__name__
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    return name


# --------------------------------------------------------------------------------------------------
# model resolution
# --------------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """True when the user asked for no Hub traffic (``HF_HUB_OFFLINE``), read at call time."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def looks_like_local_path(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else path-shaped is a local folder."""
    return (
        model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or "\\" in model
        or (len(model) > 1 and model[1] == ":")
    )


def local_fingerprint(path: Path) -> str:
    """Content fingerprint of a local model folder, cached by (file, size, mtime) in the cache dir.

    Never read from a fingerprint file inside the folder (a copy of a builtin model carries one):
    weights edited after it was written would keep the old fingerprint and mix two models.
    """
    from synthgen.generate.tiny import model_fingerprint

    stat_key = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            stat_key.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    stat_key.update(str(path.resolve()).encode())
    memo = cache_dir() / "fingerprints" / f"{stat_key.hexdigest()[:32]}.txt"
    if memo.is_file():
        text = memo.read_text().strip()
        if len(text) == 64:
            return text
    fp = model_fingerprint(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(fp + "\n")
    os.replace(tmp, memo)
    return fp


def _check_pinned(model: str, fingerprint: str, revision: Optional[str]) -> None:
    """A builtin/local model pinned with ``revision`` must match its fingerprint (prefix >= 7)."""
    if revision is None:
        return
    want = revision.removeprefix("sha256:")
    if len(want) < 7 or not fingerprint.startswith(want.lower()):
        raise SynthgenError(
            f"model {model!r} has fingerprint sha256:{fingerprint[:16]}..., but the recipe pins revision "
            f"{revision!r}; the model files changed (remove generator.revision or rebuild from the recipe's model)"
        )


def _hub_error(model: str, revision: Optional[str], exc: BaseException) -> SynthgenError:
    from huggingface_hub import errors as hf_errors

    rev = revision or "main"
    chain = []
    e: Optional[BaseException] = exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(x, hf_errors.RevisionNotFoundError) for x in chain):
        return SynthgenError(f"cannot load model {model!r}: revision {rev!r} does not exist on the Hub")
    if any(isinstance(x, hf_errors.GatedRepoError) for x in chain):
        return SynthgenError(
            f"cannot load model {model!r} (revision {rev}): the repository is gated; accept its license on "
            "the Hub and log in (hf auth login)"
        )
    if any(isinstance(x, hf_errors.RepositoryNotFoundError) for x in chain):
        return SynthgenError(
            f"cannot load model {model!r} (revision {rev}): no such repository on the Hub (or it is private: "
            "log in with hf auth login)"
        )
    text = " ".join(str(x) for x in chain).lower()
    offline_words = (
        "offline",
        "outgoing traffic has been disabled",
        "couldn't connect",
        "connection",
        "name or service not known",
        "not fully cached",
        "cannot find an appropriate cached snapshot",
        "local_files_only",
        "timed out",
    )
    if hub_offline() or any(w in text for w in offline_words):
        how = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub is unreachable (offline?)"
        return SynthgenError(
            f"cannot load model {model!r} (revision {rev}): not in the local Hugging Face cache and {how}"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SynthgenError(f"cannot load model {model!r} (revision {rev}): {first[:300]}")


def _download_hub(model: str, revision: Optional[str]) -> tuple[Path, str]:
    """Fetch (or find in the HF cache) a Hub pipeline; returns its snapshot folder and commit hash."""
    from diffusers import DiffusionPipeline

    from synthgen.generate.classcond import download_class_conditioned

    # diffusers' own loggers print multi-line "will try the cache" notes on every offline miss;
    # the one-line SynthgenError below says it all.
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)
    try:
        folder = download_class_conditioned(model, revision, local_files_only=hub_offline())
        if folder is None:
            folder = DiffusionPipeline.download(
                model, revision=revision, local_files_only=hub_offline() or None,
                use_safetensors=None if pickle_weights_allowed() else True,
            )
    except (OSError, ValueError, RuntimeError) as exc:
        raise _hub_error(model, revision, exc) from None
    except Exception as exc:  # huggingface_hub / httpx errors that are not OSErrors
        if type(exc).__module__.split(".")[0] in {"huggingface_hub", "requests", "httpx", "urllib3"}:
            raise _hub_error(model, revision, exc) from None
        raise
    finally:
        diffusers_logger.setLevel(level)
    folder = Path(folder)
    commit = folder.name if folder.parent.name == "snapshots" else None
    if commit is None:
        commit = "sha256:" + local_fingerprint(folder)
    return folder, commit


def resolve_model(cfg: GeneratorConfig) -> tuple[Path, str]:
    """(folder to load, resolved revision) for ``cfg.model``; downloads Hub models if needed."""
    model = cfg.model
    if model.startswith("builtin:"):
        from synthgen.generate.tiny import builtin_model_path, cached_fingerprint

        path = builtin_model_path(model)
        fp = cached_fingerprint(path)
        _check_pinned(model, fp, cfg.revision)
        return path, "sha256:" + fp
    path = Path(os.path.expanduser(model))
    if path.exists() or looks_like_local_path(model):
        if not path.is_dir():
            raise ModelNotFoundError(f"model folder not found: {model}")
        if not (path / "model_index.json").is_file():
            raise SynthgenError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
        fp = local_fingerprint(path)
        _check_pinned(model, fp, cfg.revision)
        return path, "sha256:" + fp
    return _download_hub(model, cfg.revision)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_loading():
    """Hide diffusers'/transformers' per-component loading and saving progress bars meanwhile."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    restore = []
    for mod in (dlog, tlog):
        if mod.is_progress_bar_enabled():
            mod.disable_progress_bar()
            restore.append(mod)
    try:
        yield
    finally:
        for mod in restore:
            mod.enable_progress_bar()


def load_pipeline(cfg: GeneratorConfig) -> LoadedPipeline:
    """Load ``cfg.model`` onto ``cfg.device`` in ``cfg.dtype`` with ``cfg.scheduler``.

    Then :func:`prepare_pipeline` applies the recipe's speed settings (attention, fused QKV,
    channels-last, step caching, ``torch.compile`` of the UNet and VAE decoder; ``accel.py``).
    """
    import torch
    from diffusers import DiffusionPipeline

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if dtype == torch.float16 and device == "cpu":
        warnings.warn("float16 on CPU is slow and often unsupported; consider dtype: float32", stacklevel=2)
    folder, revision = resolve_model(cfg)
    from synthgen.generate.classcond import is_class_conditioned, load_class_conditioned

    if is_class_conditioned(folder):  # synthgen's own pipeline class: loaded by class, never by remote code
        return prepare_pipeline(load_class_conditioned(folder, cfg.model, dtype), cfg, revision=revision)
    try:
        without_checker = {} if cfg.safety_checker else no_safety_checker_kwargs(folder)
        with quiet_loading():
            # safetensors only: pickle (.bin) weights can run code when loaded (opt in: ALLOW_PICKLE_ENV)
            pipe = DiffusionPipeline.from_pretrained(
                folder, use_safetensors=None if pickle_weights_allowed() else True, **{_dtype_kwarg(): dtype},
                **without_checker,
            )
    except (OSError, ValueError, TypeError, AttributeError, ImportError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "safetensors" in first.lower() and not pickle_weights_allowed():
            raise SynthgenError(
                f"model {cfg.model!r} has no safetensors weights; its pickle (.bin) weights could run code "
                f"when loaded. If you trust them, set {ALLOW_PICKLE_ENV}=1"
            ) from None
        raise SynthgenError(f"cannot load model {cfg.model!r} from {folder}: {first[:300]}") from None
    if not hasattr(pipe, "scheduler") or not hasattr(pipe, "unet"):
        raise SynthgenError(f"model {cfg.model!r} is a {type(pipe).__name__}, not a text-to-image UNet pipeline")
    return prepare_pipeline(pipe, cfg, revision=revision)


def no_safety_checker_kwargs(folder: Path) -> dict[str, Any]:
    """``from_pretrained`` arguments that load ``folder``'s pipeline without its safety checker, the
    diffusers way (``safety_checker=None``, ``requires_safety_checker=False``: its weights are never
    read, and no "you have disabled the safety checker" warning); only the arguments its pipeline
    class takes, since diffusers warns about any other."""
    import inspect

    import diffusers

    cls = getattr(diffusers, str(model_index(folder).get("_class_name")), None)
    params = inspect.signature(cls.__init__).parameters if isinstance(cls, type) else {}
    without = {"safety_checker": None, "requires_safety_checker": False}
    return {name: value for name, value in without.items() if name in params}


def prepare_pipeline(pipe: Any, cfg: GeneratorConfig, *, revision: str, model: Optional[str] = None) -> LoadedPipeline:
    """Put a diffusers pipeline on ``cfg.device`` in ``cfg.dtype`` with ``cfg``'s scheduler and speed settings.

    ``load_pipeline`` ends here; benchmarks call it with pipelines built in memory (``sd15.py``).
    ``revision`` is what provenance records as the model's revision; ``model`` defaults to ``cfg.model``.
    """
    from synthgen.generate.accel import apply_speedups
    from synthgen.generate.classcond import conditioning_record

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    scheduler_name = set_scheduler(pipe, cfg.scheduler)
    if not cfg.safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # an in-memory pipeline (load_pipeline never loads it then)
    pipe = pipe.to(device)
    if pipe.unet.dtype != dtype:  # an in-memory pipeline; from_pretrained already loads in dtype
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    speed = apply_speedups(pipe, cfg, device)

    return LoadedPipeline(
        pipe=pipe,
        device=device,
        dtype=dtype,
        model=model or cfg.model,
        model_revision=revision,
        scheduler_name=scheduler_name,
        scheduler_class=type(pipe.scheduler).__name__,
        pipeline_class=type(pipe).__name__,
        versions=library_versions(),
        compiled=bool(speed.compiled),
        attention=speed.attention,
        fused_qkv=speed.fused_qkv,
        channels_last=speed.channels_last,
        compiled_modules=list(speed.compiled),
        step_cache_interval=speed.step_cache_interval,
        vae_decode_chunk=cfg.vae_decode_chunk,
        prompt_cache=cfg.prompt_cache,
        conditioning=conditioning_record(pipe),
    )


def model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``model_index.json`` of a pipeline folder (for inspection and tests)."""
    return json.loads((Path(folder) / "model_index.json").read_text())
