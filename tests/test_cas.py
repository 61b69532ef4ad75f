"""CAS end to end on small CIFAR-10 subsets (CPU, 1 epoch), and its input checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest


CIFAR = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10"
pytestmark = [
    pytest.mark.skipif(not CIFAR.is_dir(), reason=f"real CIFAR-10 folder not found at {CIFAR} (../shared beside the clone)"),
    # tiny kernels gain nothing from threads; on shared cores OpenMP spin-waiting slows them
    pytest.mark.usefixtures("one_torch_thread"),
]
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PERMUTED = ["truck", "cat", "ship", "airplane", "frog", "horse", "bird", "deer", "automobile", "dog"]
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
---
# test synthetic set
"""
SMALL = ["model=resnet20", "epochs=1", "batch_size=64", "real_fit=300", "real_val=100", "limit_real_test=200"]
FAST = [a for kv in SMALL for a in ("--set", kv)] + ["--threads", "1", "-q"]


@pytest.fixture(scope="module")
def cifar_rows():
    """Real images 1000.. of the training split (disjoint from the first 300 used as the real set)."""
    import datasets

    ds = datasets.load_dataset(str(CIFAR), split="train").select(range(1000, 1700))
    return ds.cast_column("img", datasets.Image(decode=False))


def write_folder(path: Path, rows, names: list[str] | None, n: int | None = None, with_label: bool = True, positional: bool = False) -> Path:
    """A Hub-layout dataset folder (README.md configs + data/*.parquet) with the columns image/label;
    each image keeps its real class, written under that class's index in ``names``."""
    import datasets

    rows = rows if n is None else rows.select(range(n))
    feats = {"image": datasets.Image()}
    data = {"image": rows["img"]}
    if with_label:
        feats["label"] = datasets.ClassLabel(names=names)
        data["label"] = [y if positional else names.index(NAMES[y]) for y in rows["label"]]
    (path / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(data, features=datasets.Features(feats)).to_parquet(str(path / "data/train-00000-of-00001.parquet"))
    (path / "README.md").write_text(README)
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from synthgen.cli import main

    capsys.readouterr()  # drop what the test's own set-up printed (e.g. to_parquet's progress bar)
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def no_training(monkeypatch):
    from synthgen.train import cas

    def boom(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(cas, "train_classifier", boom)


def small_protocol(*extra):
    from synthgen.train.cas import load_cas_protocol

    return load_cas_protocol(None, [*SMALL, *extra])[0]


def test_cas_cli_end_to_end_with_scales(tmp_path, cifar_rows, capsys):
    syn = write_folder(tmp_path / "syn", cifar_rows, PERMUTED, n=600)
    out = tmp_path / "res.json"
    rc, stdout, err = run_cli(["cas", str(syn), "--real", str(CIFAR), "--scales", "1,2", "--output", str(out), *FAST], capsys)
    assert rc == 0, err
    assert "Real" in stdout and "×1" in stdout and "×2" in stdout
    res = json.loads(out.read_text())
    assert [r["scale"] for r in res["runs"]] == [1, 2]
    assert [r["n_images"] for r in res["runs"]] == [300, 600] and res["scale_unit"] == 300
    assert [(r["n_train"], r["n_val"]) for r in res["runs"]] == [(300, 100), (600, 100)]  # real held-out val
    for r in [res["real_baseline"], *res["runs"]]:
        assert 0 <= r["top1"] <= r["top5"] <= 100 and r["n_test"] == 200 and r["epochs_run"] == 1
    values = res["protocol"]["values"]
    assert values["model"] == "resnet20" and values["epochs"] == 1 and values["name"] == "cas-lomurno"
    assert values["label_smoothing"] == 0.1 and values["lr"] == 1e-3 and values["normalization"] == "unit"
    assert values["adam_eps"] == 1e-7 and values["model_init"] == "keras"  # Keras' epsilon and initialisers
    assert res["protocol"]["file"].endswith("train/cas-lomurno.yaml") and len(res["protocol"]["hash"]) == 16
    import hashlib

    assert res["protocol"]["file_sha256"] == hashlib.sha256(Path(res["protocol"]["file"]).read_bytes()).hexdigest()
    assert res["environment"]["device"] == "cpu" and res["environment"]["versions"]["torch"]
    assert "host" not in res["environment"] and __import__("socket").gethostname() not in out.read_text()
    assert res["real"]["train"]["fingerprint"] and res["synthetic"]["fingerprint"]
    assert res["real"]["validation"]["subset"] == "[300:400]" and res["real"]["fit"]["subset"] == "[0:300]"
    assert res["real_baseline"]["cached"] is False
    for r in [res["real_baseline"], *res["runs"]]:
        assert_per_class_sums_to_top1(r, res)
    assert GAPS_TITLE in stdout and "(×2;" in stdout  # the largest scale's classes, all 10 (default: up to 10)
    assert all(re.search(rf"^\W*{n}\W", stdout, flags=re.M) for n in NAMES)
    # the real baseline is cached: a second run (another seed of the synthetic runs is not asked) reuses it
    rc, stdout, err = run_cli(["cas", str(syn), "--real", str(CIFAR), "--output", str(out), "--worst-classes", "0", *FAST], capsys)
    assert rc == 0, err
    res2 = json.loads(out.read_text())
    assert res2["real_baseline"]["cached"] is True
    assert res2["real_baseline"]["top1"] == res["real_baseline"]["top1"]
    assert res2["real_baseline"]["class_top1"] == res["real_baseline"]["class_top1"]  # the cache holds them
    assert GAPS_TITLE not in stdout and "Real" in stdout
    assert res2["runs"][0]["scale"] is None and res2["runs"][0]["n_images"] == 600


GAPS_TITLE = "Classes furthest below the real baseline"


def assert_per_class_sums_to_top1(run: dict, result: dict) -> None:
    """Per-class top-1 weighted by the test rows of each class is the overall top-1 (to rounding)."""
    counts = result["real"]["test"]["class_counts"]
    assert list(counts) == NAMES and sum(counts.values()) == run["n_test"]
    assert set(run["class_top1"]) == set(NAMES) and all(0 <= v <= 100 for v in run["class_top1"].values())
    weighted = sum(run["class_top1"][n] * counts[n] for n in NAMES) / run["n_test"]
    assert weighted == pytest.approx(run["top1"], abs=1e-3)


def test_a_class_relabelled_as_another_tops_the_gap_list(tmp_path, cifar_rows, capsys):
    """A synthetic set in which every image of the class the real baseline scores best on is
    labelled as another class: the classifier never learns that class, so its synthetic top-1 is
    ~0 and it heads the real - synthetic gap list, in the JSON and in what the CLI prints."""
    from synthgen.train.cas import cas_score, class_gaps

    sets = ["model=resnet20", "epochs=3", "batch_size=32", "real_fit=400", "real_val=100", "limit_real_test=300"]
    # the baseline (cached for the CLI run below; limit_synthetic is not part of its key), with a
    # synthetic run on 64 images only: which class does the real baseline score best on?
    plain = write_folder(tmp_path / "plain", cifar_rows, NAMES, n=64)
    first = cas_score(str(plain), str(CIFAR), small_protocol(*sets), seed=2, device="cpu")
    real = first["real_baseline"]["class_top1"]
    assert_per_class_sums_to_top1(first["real_baseline"], first)
    assert_per_class_sums_to_top1(first["runs"][0], first)
    best = max(NAMES, key=lambda n: real[n])
    into = NAMES[(NAMES.index(best) + 1) % 10]
    rows = cifar_rows.select(range(400))
    relabelled = rows.map(lambda r: {"label": NAMES.index(into) if NAMES[r["label"]] == best else r["label"]})
    assert relabelled["label"].count(NAMES.index(best)) == 0 and rows["label"].count(NAMES.index(best)) > 20
    syn = write_folder(tmp_path / "relabelled", relabelled, NAMES)

    out = tmp_path / "res.json"
    args = [a for kv in sets for a in ("--set", kv)]
    rc, stdout, err = run_cli(["cas", str(syn), "--real", str(CIFAR), "--seed", "2", "--worst-classes", "3", "--threads", "1",
                               "-q", "-o", str(out), *args], capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["real_baseline"]["cached"] is True and res["real_baseline"]["class_top1"] == real
    run = res["runs"][0]
    assert_per_class_sums_to_top1(run, res)
    gaps = class_gaps(res, top=None)
    assert len(gaps) == 10 and [g["gap"] for g in gaps] == sorted((g["gap"] for g in gaps), reverse=True)
    assert gaps[0]["class"] == best and gaps[0]["synthetic"] == run["class_top1"][best] <= 5.0
    assert gaps[0]["real"] == real[best] > 20 and gaps[0]["gap"] == pytest.approx(real[best] - run["class_top1"][best])
    # the CLI's table: the title, then the three worst classes with real, synthetic and gap
    table = stdout[stdout.index(GAPS_TITLE):]
    listed = re.findall(r"^\W*(\w+)\W+([\d.]+)\W+([\d.]+)\W+([+-][\d.]+)", table, flags=re.M)
    assert [name for name, *_ in listed] == [g["class"] for g in gaps[:3]]
    assert listed[0] == (best, f"{real[best]:.2f}", f"{run['class_top1'][best]:.2f}", f"{gaps[0]['gap']:+.2f}")


def test_real_train_scored_as_synthetic_equals_baseline():
    from synthgen.train.cas import cas_score

    p = small_protocol("limit_synthetic=300")
    res = cas_score(str(CIFAR), str(CIFAR), p, seed=5, device="cpu", use_cache=False)
    base, run = res["real_baseline"], res["runs"][0]
    assert run["n_images"] == 300
    assert run["top1"] == base["top1"] and run["top5"] == base["top5"] and run["test_loss"] == base["test_loss"]
    assert run["class_top1"] == base["class_top1"]
    assert [h["train_loss"] for h in run["history"]] == [h["train_loss"] for h in base["history"]]


def test_labels_matched_by_name(tmp_path, cifar_rows):
    from synthgen.train.cas import cas_score

    p = small_protocol()
    a = cas_score(str(write_folder(tmp_path / "a", cifar_rows, NAMES, n=300)), str(CIFAR), p, seed=1, device="cpu")
    b = cas_score(str(write_folder(tmp_path / "b", cifar_rows, PERMUTED, n=300)), str(CIFAR), p, seed=1, device="cpu")
    assert a["runs"][0]["top1"] == b["runs"][0]["top1"] and a["runs"][0]["test_loss"] == b["runs"][0]["test_loss"]
    assert b["real_baseline"]["cached"] is True  # same protocol/seed/device: computed once
    # matching is by name: positions alone would train "truck" images as "airplane" and differ
    c_names = ["Airplane", " Automobile", "BIRD", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    from synthgen.train.cas import match_labels

    assert match_labels(c_names, NAMES).tolist() == list(range(10))
    assert match_labels(PERMUTED, NAMES).tolist() == [NAMES.index(n) for n in PERMUTED]


def _expect_error(args, capsys, monkeypatch, pattern):
    no_training(monkeypatch)
    rc, out, err = run_cli(args, capsys)
    assert rc != 0
    lines = err.splitlines()  # one line: no datasets progress bars before it, no traceback
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def test_bad_inputs_fail_before_training(tmp_path, cifar_rows, capsys, monkeypatch):
    real = ["--real", str(CIFAR), *FAST]
    nolabel = write_folder(tmp_path / "nolabel", cifar_rows, None, n=20, with_label=False)
    _expect_error(["cas", str(nolabel), *real], capsys, monkeypatch, "no label column")
    bad = write_folder(tmp_path / "bad", cifar_rows, NAMES[:8] + ["dragon", "unicorn"], n=50, positional=True)
    line = _expect_error(["cas", str(bad), *real], capsys, monkeypatch, "not in the real set")
    assert "'dragon'" in line and "'unicorn'" in line and "'cat'" not in line
    # an empty split
    import datasets

    empty = tmp_path / "empty"
    (empty / "data").mkdir(parents=True)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    datasets.Dataset.from_dict({"image": [], "label": []}, features=feats).to_parquet(str(empty / "data/train-00000-of-00001.parquet"))
    (empty / "README.md").write_text(README)
    _expect_error(["cas", str(empty), *real], capsys, monkeypatch, "empty")
    good = write_folder(tmp_path / "good", cifar_rows, NAMES, n=50)
    _expect_error(["cas", str(good), "--split", "validation", *real], capsys, monkeypatch, "no split 'validation'; available: train")
    line = _expect_error(["cas", str(good), "--scales", "1,2", *real], capsys, monkeypatch, r"scale x1 needs 300 .* has 50")
    assert "x0" not in line and "less than one scale unit (300 images)" in line
    big = write_folder(tmp_path / "big", cifar_rows, NAMES, n=400)
    _expect_error(["cas", str(big), "--scales", "1,2", *real], capsys, monkeypatch, r"scale x2 needs 600 .*largest scale it serves is x1")
    _expect_error(["cas", str(good), *real, "--set", "modle=resnet20"], capsys, monkeypatch, r"modle: unknown key \(did you mean model\?\)")
    _expect_error(["cas", str(good), *real, "--protocol", "no-such-protocol"], capsys, monkeypatch, r"unknown training recipe")
    _expect_error(["cas", str(good), *real, "--protocol", "rotation-vit-demo"], capsys, monkeypatch, r"not a CAS protocol")
    _expect_error(["cas", str(good), *real, "--set", "real_fit=49000", "--set", "real_val=2000"], capsys, monkeypatch,
                  r"fits on 49000 and validates on 2000 real training images")
    _expect_error(["cas", str(good), "--real", str(tmp_path / "nowhere"), *FAST], capsys, monkeypatch, "not found")
    # a revision that does not exist / an unknown Hub dataset (offline: no network in tests)
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _expect_error(["cas", "nobody-xyz/no-such-set", "--revision", "v9.9.9", *real], capsys, monkeypatch, "cannot load dataset nobody-xyz/no-such-set at revision 'v9.9.9'")
    _expect_error(["cas", str(good), "--revision", "v1.0.0", *real], capsys, monkeypatch, "revision")
    _expect_error(["cas", str(good), *real, "--set", "compile=fastest"], capsys, monkeypatch, "compile: .*compile must be auto, off")
    # a folder as --output would fail only after the whole run, losing its results
    _expect_error(["cas", str(good), *real, "--output", str(tmp_path)], capsys, monkeypatch, r"--output .* is a folder; give a file path")
    rc, out, err = run_cli(["cas", str(good), "--real", str(CIFAR), "--scales", "x", *FAST], capsys)
    assert rc == 1 and "error: --scales" in err


def test_threads_below_one_is_refused_in_one_line(capsys):
    """--threads 0 was skipped silently (torch's choice) and -2 ended in torch's traceback."""
    for value in ("0", "-2"):
        rc, _, err = run_cli(["cas", "synthetic", "--real", "real", "--threads", value], capsys)
        assert rc == 2 and err.splitlines() == [
            "error: Invalid value for '--threads': Input should be greater than or equal to 1 (see 'synthgen cas --help')"]


@pytest.mark.slow
def test_cas_on_a_synthgen_build_folder(tmp_path, capsys):
    """A real `synthgen build demo` folder (tiny pipeline, 20 images) scores end to end."""
    folder = tmp_path / "demo"
    rc, out, err = run_cli(["build", "demo", "--limit", "20", "--out", str(folder), "-q"], capsys)
    if rc != 0:
        pytest.fail(f"synthgen build demo failed: {err[-500:]}")
    res_path = tmp_path / "demo-cas.json"
    rc, out, err = run_cli(
        ["cas", str(folder), "--real", str(CIFAR), "--set", "epochs=1", "--set", "batch_size=8", "--set", "real_fit=20",
         "--set", "real_val=20", "--set", "limit_real_test=100", "--threads", "1", "-q", "-o", str(res_path)], capsys,
    )
    assert rc == 0, err
    res = json.loads(res_path.read_text())
    assert res["runs"][0]["n_images"] == 20 and res["image_size"] == 32
    assert set(res["label_map"].values()) <= set(NAMES)


def test_synthetic_runs_validate_on_real_held_out_images_and_never_read_test(tmp_path, cifar_rows, monkeypatch):
    """Instrumented: every run (baseline and synthetic scales) validates on real training images
    300..399 that no run fits on; the test split reaches nothing but the final scoring."""
    from synthgen.train import cas
    from synthgen.train.callbacks import LambdaCallback

    trained, loads, scored = [], [], []
    real_train, real_load, real_eval = cas.train_classifier, cas.load_image_dataset, cas.evaluate_classifier

    def spy_train(model, train, val, *a, **k):
        trained.append((dict(train.source), dict(val.source), len(val)))
        return real_train(model, train, val, *a, **k)

    def spy_load(source, split, **k):
        loads.append(split)
        return real_load(source, split, **k)

    def spy_eval(model, ds, **k):
        scored.append(dict(ds.source))
        return real_eval(model, ds, **k)

    monkeypatch.setattr(cas, "train_classifier", spy_train)
    monkeypatch.setattr(cas, "load_image_dataset", spy_load)
    monkeypatch.setattr(cas, "evaluate_classifier", spy_eval)
    syn = write_folder(tmp_path / "syn", cifar_rows, PERMUTED, n=600)
    p = small_protocol()
    cas.cas_score(str(syn), str(CIFAR), p, scales=[1, 2], device="cpu", use_cache=False)
    real_id = str(CIFAR.resolve())
    assert len(trained) == 3  # the real baseline, x1, x2
    for fit_src, val_src, n_val in trained:
        assert (val_src["id"], val_src["split"], val_src["subset"], n_val) == (real_id, "train", "[300:400]", 100)
        assert fit_src["split"] == "train"
    assert trained[0][0]["subset"] == "[0:300]" and trained[0][0]["id"] == real_id
    assert [t[0]["id"] for t in trained[1:]] == [str(syn.resolve())] * 2
    assert [s["split"] for s in scored] == ["test"] * 3

    # one classifier on its own (the API the class-conditioning tuner uses): no test split at all
    loads.clear(), scored.clear()
    splits = cas.load_real_splits(str(CIFAR), p)
    assert splits.test is None and "test" not in loads
    synthetic = cas.relabel_to_real(real_load(str(syn), "train", limit=300), splits.class_names)
    seen = []
    run = cas.train_cas_classifier(synthetic, splits.val, p.model_copy(update={"epochs": 2}), seed=0, device="cpu",
                                   callbacks=[LambdaCallback(lambda e, m: seen.append((e, m["val_acc"])))])
    assert "test" not in loads and not scored and "top1" not in run.metrics
    assert [e for e, _ in seen] == [1, 2] and [h["val_acc"] for h in run.history] == [v for _, v in seen]
    assert run.metrics["best_val_acc"] == max(v for _, v in seen) and run.metrics["n_val"] == 100
    # a callback that stops the run (Optuna pruning does this)
    stopped = cas.train_cas_classifier(synthetic, splits.val, p.model_copy(update={"epochs": 5}), device="cpu",
                                       callbacks=[LambdaCallback(lambda e, m: e >= 1)])
    assert stopped.metrics["epochs_run"] == 1 and stopped.metrics["stopped_early"]


def test_scales_fit_on_nested_prefixes_of_one_seeded_shuffle(tmp_path, cifar_rows, capsys, monkeypatch):
    """A class-sorted synthetic set (an imagefolder export is one): scale x1 fits on the first unit of
    a permutation seeded by --seed, not on the first rows (which would be 3 classes out of 10), x2 on
    a superset; a class the x1 rows lack (one 'truck' image, placed outside them) is recorded and warned."""
    import torch

    from synthgen.train import cas

    seed, n = 3, 600
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    labels = list(cifar_rows["label"])
    trucks = [i for i, y in enumerate(labels) if NAMES[y] == "truck"]
    others = sorted((i for i, y in enumerate(labels) if NAMES[y] != "truck"), key=lambda i: labels[i])[: n - 1]
    order = others[:]
    order.insert(int(perm[-1]), trucks[0])  # the one truck sits at the row the shuffle puts last
    syn = write_folder(tmp_path / "sorted", cifar_rows.select(order), NAMES)
    syn_labels = torch.tensor([labels[i] for i in order])
    assert len(set(syn_labels[:300].tolist()) - {9}) <= 5  # the first 300 rows: a few classes only

    fitted = []
    real_train = cas.train_classifier

    def spy(model, train, val, *a, **k):
        fitted.append(train.labels.clone())
        return real_train(model, train, val, *a, **k)

    monkeypatch.setattr(cas, "train_classifier", spy)
    out = tmp_path / "res.json"
    rc, stdout, err = run_cli(["cas", str(syn), "--real", str(CIFAR), "--scales", "1,2", "--seed", str(seed), "--no-cache",
                               "--output", str(out), *FAST], capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    x1, x2 = res["runs"]
    first = torch.sort(perm[:300]).values
    assert torch.equal(fitted[1], syn_labels[first]) and torch.equal(fitted[2], syn_labels)  # x2 = every row
    assert len(set(fitted[1].tolist())) == 9 and torch.bincount(fitted[1]).max() <= 50  # ~33 a class, not sorted
    assert x1["missing_classes"] == ["truck"] and x2["missing_classes"] == [] and res["missing_classes"] == []
    assert "warning" in err and "scale x1 (300 images) has no images of 1 class(es)" in err and "truck" in err
    import hashlib

    s = res["scale_sampling"]
    assert (s["seed"], s["rows"]) == (seed, n) and "randperm" in s["method"]
    assert s["sha256"] == hashlib.sha256(perm.numpy().astype("<i8").tobytes()).hexdigest()
    # the real held-out validation images are unchanged for every run
    assert [(r["n_train"], r["n_val"]) for r in res["runs"]] == [(300, 100), (600, 100)]
    assert res["real"]["validation"]["subset"] == "[300:400]"


def test_real_test_split_with_string_labels_is_matched_by_name():
    """String labels are numbered per split: a real test split lacking a class gets the training split's ids."""
    import torch

    from synthgen.errors import SynthgenError
    from synthgen.train.cas import load_real_splits
    from synthgen.train.data import ImageTensorDataset

    imgs = torch.zeros(20, 3, 8, 8, dtype=torch.uint8)
    train = ImageTensorDataset(imgs, torch.arange(20) % 10, class_names=NAMES)
    test_names = NAMES[1:]  # no airplane: 'automobile' is id 0 here
    test = ImageTensorDataset(imgs[:9], torch.arange(9), class_names=test_names)
    p = small_protocol("real_fit=10", "real_val=10", "limit_real_test=null")
    splits = load_real_splits((train, test), p, with_test=True)
    assert splits.test.labels.tolist() == list(range(1, 10)) and splits.test.class_names == NAMES
    odd = ImageTensorDataset(imgs[:2], torch.tensor([0, 1]), class_names=["cat", "lorry"])
    with pytest.raises(SynthgenError, match=r"1 real test split 'test' label name\(s\) not in the real training split 'train': 'lorry'"):
        load_real_splits((train, odd), p, with_test=True)


def test_lomurno_protocol_trains_with_keras_epsilon_and_initialisers(monkeypatch):
    """cas-lomurno: Adam eps 1e-7 (Keras' default) and their Keras initialisers (HeNormal convs,
    GlorotNormal Dense, zero biases); other protocols and TrainConfig keep torch's defaults."""
    import torch

    from synthgen.train import cas, classify
    from synthgen.train.classify import TrainConfig
    from synthgen.train.data import ImageTensorDataset
    from synthgen.train.models import create_model, keras_init_

    assert TrainConfig().adam_eps == 1e-8
    carved = cas.load_cas_protocol("cas-carved-val")[0]
    assert (carved.adam_eps, carved.model_init) == (1e-8, "torch")

    seen = {}
    real_build, real_train = classify.build_optimizer, cas.train_classifier

    def spy_build(*a, **k):
        seen["opt"] = real_build(*a, **k)
        return seen["opt"]

    def spy_train(model, *a, **k):
        seen["fc_bias"] = model.fc.bias.detach().clone()
        return real_train(model, *a, **k)

    monkeypatch.setattr(classify, "build_optimizer", spy_build)
    monkeypatch.setattr(cas, "train_classifier", spy_train)
    g = torch.Generator().manual_seed(0)
    data = ImageTensorDataset(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(16) % 10,
                              class_names=NAMES)
    for proto, eps, zero_bias in ((small_protocol("max_steps=1"), 1e-7, True),
                                  (small_protocol("max_steps=1", "adam_eps=1e-8", "model_init=torch"), 1e-8, False)):
        cas.train_cas_classifier(data, data, proto, device="cpu")
        assert seen["opt"].param_groups[0]["eps"] == eps
        assert bool((seen["fc_bias"] == 0).all()) is zero_bias

    # the initialisers themselves: truncated normals with Keras' variances (std / 0.8796, cut at 2 std)
    torch.manual_seed(0)
    model = keras_init_(create_model("resnet20_w64", 10))
    fc = model.fc.weight
    glorot = (2 / (256 + 10)) ** 0.5
    assert fc.abs().max() <= 2 * glorot / 0.87962566103423978 and abs(fc.std().item() / glorot - 1) < 0.05
    conv = model.layer3[0].conv1.weight  # 128 -> 256 channels: fan_in 128 * 9
    he = (2 / (128 * 9)) ** 0.5
    assert conv.abs().max() <= 2 * he / 0.87962566103423978 and abs(conv.std().item() / he - 1) < 0.01
    assert all(bool((m.bias == 0).all()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_cas_reads_the_real_splits_it_is_told(tmp_path, cifar_rows, cifar_shards, capsys):
    """A real set without a test split (ImageNet's test split has no labels; here a train-only copy of
    CIFAR-10) is one line that names the options; --real-test-split scores on the split given, and the
    result records which splits were read."""
    syn = write_folder(tmp_path / "syn", cifar_rows, PERMUTED, n=300)
    real = cifar_shards(tmp_path / "real-train-only", [700])
    out = tmp_path / "res.json"
    rc, _, err = run_cli(["cas", str(syn), "--real", str(real), "--output", str(out), *FAST], capsys)
    assert rc == 1 and err.splitlines() == [
        f"error: {real} has no split 'test'; available: train; choose the splits with --split, --real-split and "
        "--real-test-split"], err
    assert not out.exists()
    rc, _, err = run_cli(["cas", str(syn), "--real", str(real), "--real-test-split", "train", "--output", str(out),
                          "--worst-classes", "0", *FAST], capsys)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["real"]["train"]["split"] == "train" and res["real"]["test"]["split"] == "train"
    assert res["runs"][0]["n_test"] == 200  # limit_real_test of the small protocol
    rc, _, err = run_cli(["cas", str(syn), "--real", str(real), "--real-split", "validation", "--output", str(out),
                          *FAST], capsys)
    assert rc == 1 and "has no split 'validation'; available: train; choose the splits with" in err, err


def test_runs_that_score_differently_never_share_a_default_result_file(tmp_path, monkeypatch):
    """Without --output, the file name holds what was scored and how: another protocol, split,
    scale list or seed is another file; outside the synthetic folder the synthetic set is named too
    (two Hub datasets scored from one folder did overwrite each other)."""
    from synthgen.cli.train_cmds import _default_output

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ds"
    folder.mkdir()
    base = _default_output(str(folder), "uoft-cs/cifar10", 0)
    assert base == folder / "cas" / "cas-cifar10-cas-lomurno-seed0.json"
    variants = [
        _default_output(str(folder), "uoft-cs/cifar10", 0, protocol="train/cas-carved-val.yaml"),
        _default_output(str(folder), "uoft-cs/cifar10", 0, real_test_split="validation"),
        _default_output(str(folder), "uoft-cs/cifar10", 0, split="extra"),
        _default_output(str(folder), "uoft-cs/cifar10", 0, scales=[1, 2, 5]),
        _default_output(str(folder), "uoft-cs/cifar10", 1),
    ]
    assert len({base, *variants}) == 6
    assert variants[0].name == "cas-cifar10-cas-carved-val-seed0.json"
    assert variants[1].name == "cas-cifar10-cas-lomurno-scored-on-validation-seed0.json"
    assert variants[3].name == "cas-cifar10-cas-lomurno-x1_2_5-seed0.json"
    hub = [_default_output(repo, "uoft-cs/cifar10", 0) for repo in ("org/synthetic-a", "org/synthetic-b")]
    assert hub == [tmp_path / "cas-synthetic-a-vs-cifar10-cas-lomurno-seed0.json",
                   tmp_path / "cas-synthetic-b-vs-cifar10-cas-lomurno-seed0.json"]
