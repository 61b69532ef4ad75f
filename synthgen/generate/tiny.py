"""A tiny random-weight Stable Diffusion pipeline, built from configs (no download).

``builtin:tiny-sd`` is for demos and tests: it runs the real :class:`StableDiffusionPipeline` code
path (tokenizer -> CLIP text encoder -> UNet + scheduler -> VAE decoder) with models small enough to
generate a 64x64 image in a few milliseconds on a CPU. Its images are structured noise, never
meaningful pictures.

The layout follows diffusers' own fast tests (UNet block_out_channels (32, 64), cross-attention
dim 32, a 32-wide two-layer CLIP text encoder), with a three-block VAE (16, 32, 32): its scale
factor is 4 (8 in real SD), so a 64x64 image is a 16x16 latent, the UNet's ``sample_size`` (the
pipeline's default size is therefore 64x64). Any multiple of 8 works as height/width.

Weights come from a fixed torch seed, and the tokenizer files are written here (a byte-level CLIP
BPE vocabulary with no merges: every byte is a token, with and without ``</w>``), so the saved
files are the same on every machine; :func:`model_fingerprint` hashes them and serves as the
"revision" of a builtin model. The saved folder loads with
``StableDiffusionPipeline.from_pretrained(path)``, exactly like a real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from synthgen.errors import SynthgenError
from synthgen.paths import cache_dir

#: builtin model name -> folder name under ``cache_dir()/models`` (bump the suffix when the
#: architecture or the weights change, so an old cache is never mistaken for the new model)
BUILTIN_MODELS = {"tiny-sd": "tiny-sd-v1"}

_SEED = 20240601
_MAX_LENGTH = 77
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# Files whose bytes make up the model (weights, configs, tokenizer); hashed for the fingerprint.
_FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt")
_FINGERPRINT_FILE = "synthgen_fingerprint.txt"
_VERSION_KEYS = ("_diffusers_version", "transformers_version", "_name_or_path")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tokenizer_vocab() -> dict[str, int]:
    """Byte-level vocabulary: 256 byte characters, the same with ``</w>``, then BOS and EOS (514)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [_BOS, _EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer(folder: Path) -> None:
    """Write CLIP tokenizer files (vocab.json, merges.txt, configs) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    special = {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": _MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def _components():
    """The tiny pipeline's components, with weights drawn from a fixed seed."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab_size = len(tokenizer_vocab())
    eos_id = vocab_size - 1
    bos_id = vocab_size - 2
    # torch.manual_seed seeds the default CPU generator that nn.Module initialisers use; models are
    # built on CPU in float32, so the weights are the same bytes on every machine.
    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(_SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    torch.manual_seed(_SEED + 2)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_LENGTH,
        layer_norm_eps=1e-5,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return unet, vae, text_encoder, scheduler


def build_tiny_pipeline(path: str | os.PathLike) -> Path:
    """Build the tiny pipeline and save it at ``path`` (created; must not hold another model).

    Returns ``path``. Loads with ``StableDiffusionPipeline.from_pretrained(path)``.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_dir = path / "tokenizer"
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    # Sanity: the vocabulary and the text encoder agree on the special tokens.
    if tokenizer.eos_token_id != len(tokenizer_vocab()) - 1 or tokenizer.model_max_length != _MAX_LENGTH:
        raise RuntimeError("tiny tokenizer does not load as written")
    unet, vae, text_encoder, scheduler = _components()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    from synthgen.generate.pipeline import quiet_loading

    with quiet_loading():
        pipe.save_pretrained(path, safe_serialization=True)
    # save_pretrained re-saves the tokenizer in transformers' own format; write our files again so
    # the folder holds exactly the slow-tokenizer files real SD 1.x checkpoints ship.
    for extra in ("tokenizer.json",):
        (tok_dir / extra).unlink(missing_ok=True)
    write_tokenizer(tok_dir)
    (path / _FINGERPRINT_FILE).write_text(model_fingerprint(path) + "\n")
    return path


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the model folder's weight, config and tokenizer files (relative path + content).

    Used as the "revision" of builtin and local models, which have no Hub commit hash. Files are
    hashed in sorted path order. JSON files are hashed canonically (sorted keys) without the keys
    that only record which library version wrote them (``_diffusers_version``,
    ``transformers_version``, ``_name_or_path``), so the same weights and settings give the same
    fingerprint whichever diffusers/transformers saved them.
    """
    root = Path(path)
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix in _FINGERPRINT_SUFFIXES
        and p.name != _FINGERPRINT_FILE
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise SynthgenError(f"no model files in {root}")
    for file in files:
        rel = file.relative_to(root).as_posix()
        digest.update(rel.encode() + b"\0")
        h = hashlib.sha256()
        if file.suffix == ".json":
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except ValueError:
                data = None
            if isinstance(data, dict):
                for key in _VERSION_KEYS:
                    data.pop(key, None)
                h.update(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
                digest.update(h.digest())
                continue
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digest.update(h.digest())
    return digest.hexdigest()


def cached_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint stored beside a builtin model at build time (recomputed if missing)."""
    file = Path(path) / _FINGERPRINT_FILE
    if file.is_file():
        text = file.read_text().strip()
        if len(text) == 64:
            return text
    return model_fingerprint(path)


def builtin_model_path(name: str) -> Path:
    """Folder of builtin model ``name`` (``tiny-sd`` or ``builtin:tiny-sd``), built on first use.

    The model is built into a temporary folder beside its final place and renamed into place, so a
    crash never leaves a half-built model behind, and two processes racing both end up with one.
    """
    if name.startswith("builtin:"):
        name = name[len("builtin:") :]
    if name not in BUILTIN_MODELS:
        raise SynthgenError(
            f"unknown builtin model 'builtin:{name}'; choose one of "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        )
    models = cache_dir() / "models"
    final = models / BUILTIN_MODELS[name]
    if (final / "model_index.json").is_file():
        return final
    models.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=models))
    try:
        build_tiny_pipeline(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race (final exists and is non-empty); keep theirs.
            if not (final / "model_index.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
