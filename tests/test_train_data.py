"""Models registry, the uint8 tensor datasets and the supervised trainer (CPU, small)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from synthgen.errors import SynthgenError
from hub_server import fake_hub  # noqa: F401 - the fixture

CIFAR = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10"
needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"real CIFAR-10 folder not found at {CIFAR} (../shared beside the clone)")


# ---------------------------------------------------------------- models


def test_resnet20_parameter_count_and_shapes():
    from synthgen.train.models import count_parameters, create_model, list_models

    assert {"resnet20", "resnet50", "vit_tiny", "vit_small", "vit_base"} <= set(list_models())
    m = create_model("resnet20", 10)
    n = count_parameters(m)
    assert 265_000 <= n <= 275_000, n  # He et al.: 0.27M
    assert n == 269_722  # option A (parameter-free shortcuts)
    assert count_parameters(create_model("resnet20", 10, shortcut="B")) == 272_474
    x = torch.randn(3, 3, 32, 32)
    assert m(x).shape == (3, 10)
    feat = create_model("resnet20", 0)
    assert feat.num_features == 64 and feat(x).shape == (3, 64) and feat.forward_features_pooled(x).shape == (3, 64)


def test_resnet20_w64_matches_lomurno_code():
    """Their published CIFAR-10 training log records 4,291,530 Keras parameters (BN statistics
    counted); max-pool shortcuts keep a block's input visible through the downsampling."""
    import torch.nn.functional as F

    from synthgen.train.models import count_parameters, create_model

    m = create_model("resnet20_w64", 10)
    running = sum(b.numel() for name, b in m.named_buffers() if "running" in name)
    assert count_parameters(m) + running == 4_291_530
    assert m.num_features == 256 and m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    block = m.layer2[0]  # stride 2, 64 -> 128 channels
    x = torch.randn(1, 64, 8, 8)
    short = block._shortcut(x)
    assert short.shape == (1, 128, 4, 4)
    assert torch.equal(short[:, :64], F.max_pool2d(x, 3, 2, padding=1)) and not short[:, 64:].any()


def test_vit_tiny_patch4_at_32px():
    from synthgen.train.models import create_model, extract_features

    m = create_model("vit_tiny", 10, image_size=32, patch_size=4)
    assert m.patch_embed.grid_size == (8, 8)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    assert m.num_features == 192 and extract_features(m, x).shape == (2, 192)
    assert create_model("vit_tiny", 0, image_size=32, patch_size=4)(x).shape == (2, 192)
    assert create_model("timm:resnet18", 5)(x).shape == (2, 5)


def test_unknown_model_is_one_line_error():
    from synthgen.train.models import create_model

    with pytest.raises(SynthgenError, match="unknown model"):
        create_model("resnet21", 10)
    with pytest.raises(SynthgenError, match="timm cannot create"):
        create_model("timm:no_such_net", 10)


# ---------------------------------------------------------------- data


@needs_cifar
def test_load_cifar_shapes_and_cache(monkeypatch):
    from synthgen.train import data
    from synthgen.train.data import load_image_dataset

    ds = load_image_dataset(str(CIFAR), "test", limit=200)
    assert ds.images.shape == (200, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (200,)
    assert ds.class_names[:3] == ["airplane", "automobile", "bird"] and len(ds.class_names) == 10
    assert ds.source["split"] == "test" and ds.source["fingerprint"]
    assert 0 <= int(ds.labels.min()) and int(ds.labels.max()) <= 9
    assert float(ds.images.float().mean()) > 50  # real pixels, not zeros

    # the second load must come from the tensor cache: decoding would fail now
    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "_decode_images", no_decode)
    again = load_image_dataset(str(CIFAR), "test", limit=200)
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)
    assert again.class_names == ds.class_names
    with pytest.raises(AssertionError, match="decoded again"):  # other keys are other entries
        load_image_dataset(str(CIFAR), "test", limit=200, image_size=16)


@needs_cifar
def test_resize_subset_split_and_normalise():
    from synthgen.train.data import load_image_dataset, split_train_val, to_float

    ds = load_image_dataset(str(CIFAR), "test", limit=300, image_size=16)
    assert ds.images.shape == (300, 3, 16, 16)
    tr, va = split_train_val(ds, 0.2, seed=3)
    assert len(tr) + len(va) == 300 and 50 <= len(va) <= 70
    counts = torch.bincount(va.labels, minlength=10)
    full = torch.bincount(ds.labels, minlength=10)
    assert torch.all((counts - full * 0.2).abs() <= 1)  # stratified
    tr2, va2 = split_train_val(ds, 0.2, seed=3)
    assert torch.equal(va.images, va2.images)
    _, va3 = split_train_val(ds, 0.2, seed=4)
    assert not torch.equal(va.images, va3.images)
    x = to_float(ds.images[:4], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.dtype == torch.float32
    assert torch.allclose(x, (ds.images[:4].float() / 255 - 0.5) / 0.25)


@needs_cifar
def test_load_errors_are_one_line():
    from synthgen.train.data import load_image_dataset

    with pytest.raises(SynthgenError, match=r"no split 'validation'; available: train, test"):
        load_image_dataset(str(CIFAR), "validation")
    with pytest.raises(SynthgenError, match="not found"):
        load_image_dataset("/no/such/folder", "train")
    with pytest.raises(SynthgenError, match="no column 'pixels'"):
        load_image_dataset(str(CIFAR), "test", image_column="pixels", limit=5)


def test_parquet_file_and_mixed_sizes(tmp_path):
    import datasets
    import numpy as np

    from synthgen.train.data import load_image_dataset

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), rng.integers(0, 255, (24, 30), dtype=np.uint8)]
    feats = datasets.Features({"picture": datasets.Image(), "caption_id": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"picture": imgs, "caption_id": [7, 7]}, features=feats)
    path = tmp_path / "x.parquet"
    ds.to_parquet(str(path))
    with pytest.raises(SynthgenError, match="differ in size.*image_size"):
        load_image_dataset(str(path), "train", cache=False)
    out = load_image_dataset(str(path), "train", image_size=16, group_column="caption_id")
    assert out.images.shape == (2, 3, 16, 16) and out.labels is None and out.groups.tolist() == [7, 7]
    with pytest.raises(SynthgenError, match="no label column"):
        load_image_dataset(str(path), "train", image_size=16, require_labels=True)


def test_a_corrupt_image_is_one_line_naming_the_rows_not_a_file_system_error(tmp_path):
    """PIL's error for undecodable bytes is an OSError, which the CLI would report as a
    file-system error; it is the data that is corrupt, and the message says how to check it."""
    import io

    import datasets
    import numpy as np
    from PIL import Image

    from synthgen.train.data import load_image_dataset

    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(png, format="PNG")
    cells = [{"bytes": png.getvalue(), "path": None}, {"bytes": png.getvalue()[:40], "path": None}]
    ds = datasets.Dataset.from_dict({"image": cells, "label": [0, 1]},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    ds.to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(SynthgenError, match=r"x.parquet\[train\] rows 0-1: an image cannot be decoded \(.*\): "
                                            r"the data is corrupt; `synthgen verify FOLDER`"):
        load_image_dataset(str(tmp_path / "x.parquet"), "train", cache=False)
    # streamed: torch re-raises a worker's error with the worker's traceback in the message
    from synthgen.train.runtime import Runtime
    from synthgen.train.stream import StreamBatches

    stream = StreamBatches(str(tmp_path / "x.parquet"), "train", Runtime.create("cpu"), num_workers=1)
    with pytest.raises(SynthgenError) as caught:
        list(stream.epoch(2, None))
    assert str(caught.value).startswith(f"{stream.describe()}: an image cannot be decoded (")
    assert "Traceback" not in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_an_unfinished_build_or_a_folder_of_builds_is_refused(tmp_path, cifar_shards):
    """A build folder whose manifest is not written yet holds only some shards, and a folder holding
    several builds would be read as one split of all their shards: both are one line, not data."""
    from synthgen.train.data import load_image_dataset

    builds = tmp_path / "outputs"
    first = cifar_shards(builds / "first", [6, 6])
    second = cifar_shards(builds / "nested" / "second", [4])
    (first / ".synthgen").mkdir()
    (first / ".synthgen" / "plan.json").write_text("{}")
    with pytest.raises(SynthgenError, match=r"first is an unfinished build \(no synthgen_manifest.json yet\)"):
        load_image_dataset(str(first), "train", cache=False)
    (first / "synthgen_manifest.json").write_text("{}")  # finished: the same folder now loads
    assert len(load_image_dataset(str(first), "train", cache=False)) == 12
    (second / "synthgen_manifest.json").write_text("{}")
    with pytest.raises(SynthgenError, match=r"outputs is not one dataset: it holds the synthgen builds first, "
                                            r"nested/second; name one of them"):
        load_image_dataset(str(builds), "train", cache=False)
    assert len(load_image_dataset(str(second), "train", cache=False)) == 4


def test_a_folder_whose_shards_differ_from_its_card_says_how_to_find_the_difference(tmp_path, cifar_shards):
    """A shard removed from (or added to) a finished build makes `datasets` raise its split-size
    check with two SplitInfo reprs; the user learns what happened and which command finds it."""
    from synthgen.train.data import load_image_dataset

    folder = cifar_shards(tmp_path / "build", [6, 6])
    (folder / "synthgen_manifest.json").write_text("{}")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n"
        "dataset_info:\n  splits:\n  - name: train\n    num_examples: 18\n---\n"
    )
    with pytest.raises(SynthgenError, match=r"build: its shards do not hold the rows its dataset card \(README.md\) "
                                            r"records: .*`synthgen verify .*build` names what differs$"):
        load_image_dataset(str(folder), "train", cache=False)


@needs_cifar
def test_decoding_shows_a_bar_on_a_terminal_only(tmp_path):
    """The first decode of a large split shows a bar on an interactive stderr; piped, it shows none."""
    import subprocess
    import sys

    from terminal import run_with_a_terminal_stderr

    code = ("import synthgen.train.data as d; d._DECODE_BAR_ROWS = 10; "
            f"print(len(d.load_image_dataset({str(CIFAR)!r}, 'test', limit=40, cache=False)))")
    proc, shown = run_with_a_terminal_stderr([sys.executable, "-c", code])
    assert proc.returncode == 0 and proc.stdout.strip() == b"40"
    assert f"decoding {CIFAR}[test]".encode() in shown and b"40/40" in shown
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == b""


def test_a_missing_path_that_looks_like_a_hub_id_says_so(fake_hub):
    from synthgen.train.data import load_image_dataset

    with pytest.raises(SynthgenError, match=r"cannot load dataset outputs/no-such-build \(no such local path, so it "
                                            r"was read as a Hub dataset id\)"):
        load_image_dataset("outputs/no-such-build", "train")


# ---------------------------------------------------------------- trainer


@needs_cifar
def test_classifier_is_deterministic_and_learns(one_torch_thread):
    from synthgen.train.callbacks import EarlyStopping, ReduceLROnPlateau
    from synthgen.train.classify import TrainConfig, evaluate_classifier, train_classifier
    from synthgen.train.data import load_image_dataset, split_train_val
    from synthgen.train.models import create_model
    from synthgen.train.runtime import Runtime

    ds = load_image_dataset(str(CIFAR), "train", limit=400)
    tr, va = split_train_val(ds, 0.1, seed=0)
    cfg = TrainConfig(epochs=3, batch_size=50, label_smoothing=0.1)
    rt = Runtime.create("cpu")
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("resnet20", 10)
        stop = EarlyStopping("val_loss", "min", patience=5, restore_best=model)
        r = train_classifier(model, tr, va, cfg, runtime=rt, callbacks=[ReduceLROnPlateau(None, "val_loss", "min", patience=1), stop],
                             quiet=True)
        outs.append((r, stop, evaluate_classifier(r.model, va, mean=r.mean, std=r.std, runtime=rt)))
    (r1, s1, e1), (r2, _, e2) = outs
    assert [{**h, "epoch_s": 0} for h in r1.history] == [{**h, "epoch_s": 0} for h in r2.history]
    assert e1 == e2
    assert r1.epochs_run == 3 and len(r1.history) == 3 and r1.steps == 3 * 8
    assert r1.history[-1]["train_loss"] < r1.history[0]["train_loss"] + 0.5
    # the restored weights are those of the best validation epoch
    best = min(r1.history, key=lambda h: h["val_loss"])
    assert abs(e1["loss"] - best["val_loss"]) < 1e-4 and s1.best_epoch == best["epoch"]


def test_compile_modes_resolve_per_device_and_reject_unknown_names():
    from synthgen.train.cas import load_cas_protocol
    from synthgen.train.runtime import compile_mode

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # the CAS default: CUDA graphs on a GPU (a launch-bound ResNet-20 step halves there), none on a CPU
    assert load_cas_protocol()[0].compile == "auto"
    assert compile_mode("auto", cuda) == "reduce-overhead" and compile_mode("auto", cpu) is None
    assert [compile_mode(v, cpu) for v in (False, "off", None, True, "default", "max-autotune")] == [
        None, None, None, "default", "default", "max-autotune"]
    with pytest.raises(SynthgenError, match="compile must be auto, off, default, reduce-overhead"):
        compile_mode("fastest", cpu)
    with pytest.raises(SynthgenError, match="compile must be"):
        load_cas_protocol(None, ["compile=fastest"])


def test_switch_words_that_yaml_reads_as_booleans_keep_their_meaning(tmp_path):
    """``--set compile=off`` arrives from YAML 1.1 as False (also ``no``; ``on``/``yes`` as True): the
    CAS protocol's ``compile`` and ``amp`` and a pre-training recipe's ``compile`` read them as words,
    from ``--set`` and from a recipe file."""
    import yaml

    from synthgen.train.cas import load_cas_protocol
    from synthgen.train.config import load_pretrain_config

    def cas(*sets):
        p = load_cas_protocol(None, list(sets))[0]
        return p.compile, p.amp

    assert cas("compile=off", "amp=off") == cas("compile=no", "amp=no") == ("off", "off")
    assert cas("compile=on", "amp=on") == ("default", "auto")
    assert cas("compile='off'", "amp=bf16") == ("off", "bf16")
    assert load_pretrain_config("simclr-demo", ["compile=off"]).compile == "off"
    assert load_pretrain_config("simclr-demo", ["compile=yes"]).compile == "default"
    text = (Path(__file__).resolve().parents[1] / "train/simclr-demo.yaml").read_text()
    data = yaml.safe_load(text)
    data["compile"] = "OFF_WORD"
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump(data).replace("OFF_WORD", "off"))  # unquoted in the file
    assert "compile: off" in recipe.read_text()
    assert load_pretrain_config(str(recipe)).compile == "off"
    from synthgen.classcond.config import EncoderStageConfig, validate_config

    stage = yaml.safe_load("mixed_precision: no")
    assert stage == {"mixed_precision": False}
    assert validate_config(EncoderStageConfig, stage).mixed_precision == "no"
    assert validate_config(EncoderStageConfig, {"mixed_precision": True}).mixed_precision == "auto"


@needs_cifar
def test_auto_compile_leaves_cpu_training_eager(monkeypatch, one_torch_thread):
    """compile="auto" (the CAS default) must not pay a torch.compile on a CPU."""
    from synthgen.train.classify import TrainConfig, train_classifier
    from synthgen.train.data import load_image_dataset, split_train_val
    from synthgen.train.models import create_model
    from synthgen.train.runtime import Runtime

    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile called on CPU")

    monkeypatch.setattr(torch, "compile", no_compile)
    tr, va = split_train_val(load_image_dataset(str(CIFAR), "train", limit=120), 0.2, seed=0)
    r = train_classifier(create_model("resnet20", 10), tr, va, TrainConfig(epochs=1, batch_size=32),
                         runtime=Runtime.create("cpu", compile="auto"), quiet=True)
    assert r.epochs_run == 1 and r.device == "cpu"


@needs_cifar
def test_streamed_batches_match_the_decoded_tensor(one_torch_thread):
    """The stream yields the same images and labels as the in-memory path (in order), and a full
    shuffled epoch visits every row once; a classifier trains from it."""
    from synthgen.train.classify import TrainConfig, train_classifier
    from synthgen.train.data import load_image_dataset
    from synthgen.train.models import create_model
    from synthgen.train.runtime import Runtime
    from synthgen.train.stream import StreamBatches

    rt = Runtime.create("cpu")
    ds = load_image_dataset(str(CIFAR), "train", limit=300)
    stream = StreamBatches(str(CIFAR), "train", rt, limit=300, num_workers=2, shuffle_buffer=64)
    assert len(stream) == 300 and stream.class_names == ds.class_names and stream.source["streamed"]
    xs, ys = zip(*stream.epoch(100, None))
    assert torch.equal(torch.cat(xs), ds.images) and torch.equal(torch.cat(ys), ds.labels)
    on_device = StreamBatches(str(CIFAR), "train", rt, limit=300, num_workers=0, decode="device")  # torchvision's decoder
    assert torch.equal(torch.cat([x for x, _ in on_device.epoch(100, None)]), ds.images)
    shuffled = torch.cat([y for _, y in stream.epoch(64, 1, min_batch=1)])
    assert len(shuffled) == 300 and torch.equal(torch.bincount(shuffled, minlength=10), torch.bincount(ds.labels, minlength=10))
    assert not torch.equal(shuffled, ds.labels)
    r = train_classifier(create_model("resnet20", 10), stream, None, TrainConfig(epochs=1, batch_size=64, normalization="unit"),
                         runtime=rt, quiet=True)
    assert r.epochs_run == 1 and r.steps == 5 and r.history[0]["train_loss"] > 0
    with pytest.raises(SynthgenError, match="no split 'validation'"):
        StreamBatches(str(CIFAR), "validation", rt)


def _rank(rank: int, world: int):
    """The runtime of process ``rank`` of ``world`` (the stream and the batches read only rank and
    world size; no process group is needed to see what each process would get)."""
    from synthgen.train.runtime import Runtime

    return Runtime(device=torch.device("cpu"), rank=rank, world_size=world, distributed=world > 1)


def test_streamed_ddp_epochs_have_equal_counts_and_scoring_takes_every_row(tmp_path, cifar_shards, one_torch_thread):
    """Shards of 90, 90, 96 and 96 rows on 2 processes, global batch 32: each DataLoader worker ends
    with a short batch; every process still yields the same number of batches every epoch (the
    planned batches_per_epoch), an in-order pass scores each row once, and the normalisation
    statistics are the same rows' on both processes."""
    from synthgen.train.data import channel_stats, load_image_dataset
    from synthgen.train.stream import StreamBatches

    src = str(cifar_shards(tmp_path / "uneven", [90, 90, 96, 96]))
    streams = [StreamBatches(src, "train", _rank(r, 2), num_workers=2) for r in (0, 1)]
    planned = streams[0].batches_per_epoch(32, epochs=3)
    assert planned == streams[1].batches_per_epoch(32, epochs=3) == 11  # 180 rows on the smaller share // 16
    for epoch in range(3):
        counts = [sum(1 for _ in s.epoch(32, epoch, drop_last=True, batches=planned)) for s in streams]
        assert counts == [planned, planned], (epoch, counts)
        assert [sum(1 for _ in s.epoch(32, epoch)) for s in streams] == [planned, planned]  # no plan given: the same
    scored = [torch.cat([y for _, y in s.epoch(1024, None, min_batch=1)]) for s in streams]
    assert sum(len(y) for y in scored) == 372
    whole = load_image_dataset(src, "train", cache=False)
    assert torch.equal(torch.sort(torch.cat(scored)).values, torch.sort(whole.labels).values)
    stats = [s.channel_stats() for s in streams]
    assert stats[0] == stats[1] and sum(stats[0], ()) == pytest.approx(sum(channel_stats(whole.images), ()), abs=1e-12)
    with pytest.raises(SynthgenError, match="no images"):
        StreamBatches(src, "train", _rank(0, 1), limit=0).channel_stats()
    # one process: n // batch full batches (the workers' short ones joined), then the rest
    one = StreamBatches(src, "train", _rank(0, 1), num_workers=2)
    assert one.batches_per_epoch(32) == 11 and [len(y) for _, y in one.epoch(32, 0)] == [32] * 11 + [20]


def test_streamed_string_labels_number_like_the_decoded_split(tmp_path, cifar_shards, one_torch_thread):
    """A label column of class names: a stream that needs no labels never reads it; one that does
    numbers the names sorted, exactly as the decoded split does."""
    from synthgen.train.data import load_image_dataset
    from synthgen.train.stream import StreamBatches

    src = str(cifar_shards(tmp_path / "names", [60, 60], string_labels=True))
    unlabelled = StreamBatches(src, "train", _rank(0, 1), num_workers=1, labels=False)
    assert [y for _, y in unlabelled.epoch(40, 0)] == [None, None, None]
    decoded = load_image_dataset(src, "train", cache=False)
    labelled = StreamBatches(src, "train", _rank(0, 1), num_workers=1)
    assert labelled.class_names == decoded.class_names and decoded.class_names[0] == "airplane"
    assert torch.equal(torch.cat([y for _, y in labelled.epoch(50, None, min_batch=1)]), decoded.labels)


def test_scoring_takes_every_row_once_on_any_world_size_and_training_batches_split_evenly():
    """An in-order pass over the batches of 5,000 and 4,999 rows on 1, 2 and 3 processes: each row is
    scored once; a training batch that does not divide by the processes is refused in one line."""
    from synthgen.train.batches import TensorBatches
    from synthgen.train.classify import TrainConfig, train_classifier
    from synthgen.train.data import ImageTensorDataset
    from synthgen.train.models import create_model

    for n in (5000, 4999):
        ds = ImageTensorDataset(images=torch.zeros(n, 3, 2, 2, dtype=torch.uint8), labels=torch.arange(n), class_names=["a"])
        for world in (1, 2, 3):
            rows = torch.cat([y for r in range(world) for _, y in TensorBatches(ds, _rank(r, world)).epoch(1024, None, min_batch=1)])
            assert torch.equal(torch.sort(rows).values, torch.arange(n)), (n, world)
    with pytest.raises(SynthgenError, match="batch_size 33 does not split evenly over 2 processes"):
        train_classifier(create_model("resnet20", 1), ds, None, TrainConfig(epochs=1, batch_size=33), runtime=_rank(0, 2), quiet=True)
