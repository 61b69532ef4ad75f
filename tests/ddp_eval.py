"""Score a seeded, untrained ResNet-20 on the first rows of the real CIFAR-10 test split with
``evaluate_classifier``: ``score(source, rows)`` returns top-1, rows and the per-class hits and rows.
Run as a script (``python tests/ddp_eval.py SOURCE ROWS...``, under torchrun too) it prints one JSON
line per process (one write: the processes' lines do not interleave). Used by tests/test_train_runtime.py."""

from __future__ import annotations

import json
import sys


def score(source: str, rows: list[int]) -> list[dict]:
    import torch

    from synthgen.train.classify import evaluate_classifier
    from synthgen.train.data import load_image_dataset
    from synthgen.train.models import create_model
    from synthgen.train.runtime import Runtime

    rt = Runtime.create("cpu")
    torch.manual_seed(0)
    model = create_model("resnet20", 10)
    test = load_image_dataset(source, "test", limit=max(rows))
    out = []
    for n in rows:
        ev = evaluate_classifier(model, test.subset(slice(0, n)), mean=(0.5,) * 3, std=(0.25,) * 3, runtime=rt, batch_size=16)
        out.append({"rank": rt.rank, "rows": n, **{k: ev[k] for k in ("n", "top1", "class_hits", "class_rows")}})
    rt.close()
    return out


if __name__ == "__main__":
    sys.stdout.write(json.dumps(score(sys.argv[1], [int(a) for a in sys.argv[2:]])) + "\n")
    sys.stdout.flush()
