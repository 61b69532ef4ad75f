"""Text embeddings computed once per distinct prompt, kept on the device.

Many recipes repeat prompts (StableRep's ten images per caption, a class name with few templates)
and every image of a guided batch needs the same negative-prompt embedding. The pipeline's own
``encode_prompt`` computes the embeddings (so truncation, clip-skip and dtype are the pipeline's),
once per prompt not yet kept; the ``size`` most recently used are kept. The pipeline then receives
``prompt_embeds``/``negative_prompt_embeds`` instead of strings.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Sequence


@contextlib.contextmanager
def quiet_diffusers():
    """Mute diffusers' per-call warnings (e.g. the >77-token truncation note) meanwhile."""
    import diffusers.utils.logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


class PromptEmbeddings:
    """``embeddings(prompts)`` -> (N, tokens, dim) on the pipeline's device, one encode per new prompt."""

    def __init__(self, pipe: Any, device: str, size: int) -> None:
        self.pipe = pipe
        self.device = device
        self.size = int(size)
        self.kept: OrderedDict[str, Any] = OrderedDict()
        self.encoded = 0  # prompts run through the text encoder (for tests and benchmarks)

    def _encode(self, prompts: list[str]):
        import torch

        with torch.no_grad(), quiet_diffusers():
            embeds = self.pipe.encode_prompt(prompts, self.device, 1, False)[0]
        self.encoded += len(prompts)
        return embeds

    def __call__(self, prompts: Sequence[str]):
        import torch

        prompts = list(prompts)
        if self.size == 0:
            return self._encode(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.kept))
        if missing:
            for prompt, row in zip(missing, self._encode(missing)):
                self.kept[prompt] = row.unsqueeze(0).clone()  # its own storage: eviction frees it
        for prompt in prompts:
            self.kept.move_to_end(prompt)
        rows = [self.kept[p] for p in prompts]
        while len(self.kept) > max(self.size, len(set(prompts))):
            self.kept.popitem(last=False)
        return torch.cat(rows)
