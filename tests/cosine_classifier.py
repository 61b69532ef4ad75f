"""A classifier trained with a cosine schedule for 2 epochs, from a stream of parquet shards or from
the decoded split: ``train(source, kind, batch)`` returns its steps and the learning rate after the
last one. Run as a script (``python tests/cosine_classifier.py SOURCE stream|tensor BATCH``, under
torchrun too) it prints them as a JSON line per process. Used by tests/test_train_runtime.py."""

from __future__ import annotations

import json
import sys

from synthgen.train.callbacks import Callback


class FinalLr(Callback):
    optimizer = None  # train_classifier hands it the optimizer

    def on_train_end(self) -> None:
        self.lr = self.optimizer.param_groups[0]["lr"]


def train(source: str, kind: str, batch: int) -> dict:
    import torch

    from synthgen.train.classify import TrainConfig, train_classifier
    from synthgen.train.data import load_image_dataset
    from synthgen.train.models import create_model
    from synthgen.train.runtime import Runtime
    from synthgen.train.stream import StreamBatches

    rt = Runtime.create("cpu")
    torch.manual_seed(0)
    data = StreamBatches(source, "train", rt, num_workers=2) if kind == "stream" else load_image_dataset(source, "train", cache=False)
    final = FinalLr()
    cfg = TrainConfig(epochs=2, batch_size=batch, lr_schedule="cosine", normalization="unit")
    result = train_classifier(create_model("resnet20", 10), data, None, cfg, runtime=rt, callbacks=[final], quiet=True)
    rt.close()
    return {"rank": rt.rank, "steps": result.steps, "lr": final.lr}


if __name__ == "__main__":
    print(json.dumps(train(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
