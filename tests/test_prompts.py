"""Prompt samplers: shipped tables, determinism, balance, the combinatorial space, captions, WordNet.

Real data only: the tables shipped in prompts/, the local WordNet 3.0 (/usr/share/wordnet), timm's
ImageNet class list. Each test checks values that a wrong implementation would get wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from synthgen.errors import RecipeError, SynthgenError
from synthgen.paths import PROMPTS_DIR
from synthgen.prompts import (
    CaptionSampler,
    CombinatorialSampler,
    KeyedPermutation,
    PromptRecord,
    PromptSampler,
    WordNetSampler,
    build_class_table,
    build_sampler,
    read_class_table,
    write_class_table,
)
from synthgen.prompts.tables import CIFAR10, readable_scene, title_case
from synthgen.recipe import CaptionPrompts, CombinatorialPrompts, WordNetPrompts, recipe_from_dict

SHARED = Path(__file__).resolve().parents[2] / "shared" / "prompts-data"
HAS_WORDNET = Path("/usr/share/wordnet/data.noun").is_file()
needs_wordnet = pytest.mark.skipif(not HAS_WORDNET, reason="no local WordNet: apt-get install wordnet-base")
ALL_TEMPLATES = ["{c}", "{c}, {h}", "{c}, {d}", "{c}, {h} inside {b}"]


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """A fresh synthgen cache, so the WordNet copy is made (and tested) from scratch."""
    old = os.environ.get("SYNTHGEN_CACHE")
    os.environ["SYNTHGEN_CACHE"] = str(tmp_path_factory.mktemp("synthgen-cache"))
    yield
    if old is None:
        os.environ.pop("SYNTHGEN_CACHE", None)
    else:
        os.environ["SYNTHGEN_CACHE"] = old


# --------------------------------------------------------------------------------------------------
# shipped tables
# --------------------------------------------------------------------------------------------------
def test_imagenet1k_table_complete_and_in_class_index_order():
    from timm.data import ImageNetInfo

    rows = read_class_table(PROMPTS_DIR / "imagenet1k.tsv")
    info = ImageNetInfo("imagenet-1k")
    assert [r.wnid for r in rows] == list(info.label_names())  # 1,000 ids, standard order
    assert len({r.wnid for r in rows}) == 1000
    assert len({r.name.casefold() for r in rows}) == 1000
    assert all(r.hypernym and r.definition and r.lemma for r in rows)
    first = rows[0]
    assert (first.wnid, first.lemma, first.hypernym) == ("n01440764", "tench", "cyprinid")
    # timm's lemma list and gloss come from the same WordNet: first lemma and definition agree
    for i in (0, 1, 100, 500, 999):
        lemmas, definition = info.index_to_description(i, detailed=True).split(": ", 1)
        assert rows[i].lemma == lemmas.split(", ")[0]
        assert rows[i].definition == definition
    by_wnid = {r.wnid: r for r in rows}
    assert by_wnid["n02012849"].name == "crane (wading bird)"  # two "crane" synsets disambiguated
    assert by_wnid["n03126707"].name == "crane (lifting device)"
    assert by_wnid["n01698640"].lemma == "American alligator"


def test_imagenet100_table():
    rows = read_class_table(PROMPTS_DIR / "imagenet100.tsv")
    assert len(rows) == 100 and len({r.wnid for r in rows}) == 100
    assert all(r.hypernym and r.definition for r in rows)
    in1k = {r.wnid: r for r in read_class_table(PROMPTS_DIR / "imagenet1k.tsv")}
    for r in rows:  # a subset of ImageNet-1K with the same WordNet columns
        assert (r.lemma, r.hypernym, r.definition) == (in1k[r.wnid].lemma, in1k[r.wnid].hypernym, in1k[r.wnid].definition)
    shared = SHARED / "imagenet100.txt"
    if not shared.is_file():
        pytest.skip(f"{shared} not present: cannot compare with the shared ImageNet-100 list")
    assert [r.wnid for r in rows] == shared.read_text().split()


def test_cifar10_table_names_in_order():
    rows = read_class_table(PROMPTS_DIR / "cifar10.tsv")
    assert [r.name for r in rows] == "airplane automobile bird cat deer dog frog horse ship truck".split()
    assert [r.wnid for r in rows] == [w for w, _ in CIFAR10]
    assert {r.name: r.lemma for r in rows}["automobile"] == "car"
    assert {r.name: r.hypernym for r in rows}["dog"] == "canine"


def test_places365_backgrounds_readable():
    scenes = (PROMPTS_DIR / "places365.txt").read_text().splitlines()
    assert len(scenes) == 365 and len(set(scenes)) == 365
    assert not any("/" in s or "_" in s for s in scenes)
    assert scenes[0] == "airfield"
    assert "hockey arena" in scenes and "indoor church" in scenes
    assert readable_scene("/a/arena/hockey") == "hockey arena"
    assert readable_scene("athletic_field/outdoor") == "outdoor athletic field"
    shared = SHARED / "places365_categories.txt"
    if shared.is_file():
        raw = [line.rsplit(None, 1)[0] for line in shared.read_text().splitlines() if line.strip()]
        assert scenes == [readable_scene(r) for r in raw]


def test_combinatorial_vocabulary_shape():
    sampler = CombinatorialSampler(CombinatorialPrompts(), 1, 0)
    assert sampler.axis_names == ["category", "size", "color", "view", "illumination"]
    assert sampler.radices == [1000, 8, 12, 10, 10]
    assert sampler.space_size == 9_600_000
    in1k = read_class_table(PROMPTS_DIR / "imagenet1k.tsv")
    assert sampler.class_names == [title_case(r.name) for r in in1k]
    assert "American Alligator" in sampler.class_names
    assert title_case("jack-o'-lantern") == "Jack-O'-Lantern" and title_case("iPod") == "iPod"
    # the paper's example is one point of the space
    digits = [sampler.axes[a].index(v) for a, v in zip(sampler.axis_names, ["American Alligator", "Small", "Gray", "Left-Side View", "Twilight"])]
    combination = 0
    for radix, d in zip(sampler.radices, digits):
        combination = combination * radix + d
    assert sampler.decode(combination) == digits


# --------------------------------------------------------------------------------------------------
# WordNet sampler
# --------------------------------------------------------------------------------------------------
def test_wordnet_template_fields_rendered():
    cfg = WordNetPrompts(classes="imagenet1k", templates=ALL_TEMPLATES, backgrounds="places365")
    sampler = WordNetSampler(cfg, 2000, seed=3)
    rows = read_class_table(PROMPTS_DIR / "imagenet1k.tsv")
    scenes = set((PROMPTS_DIR / "places365.txt").read_text().splitlines())
    used = Counter()
    for i in range(0, 2000, 7):
        rec = sampler[i]
        row = rows[i % 1000]
        assert isinstance(rec, PromptRecord) and rec.index == i
        assert rec.label == i % 1000 and rec.label_name == row.name and rec.meta["wnid"] == row.wnid
        template = rec.meta["template"]
        used[template] += 1
        expected = template.format(c=row.lemma, h=row.hypernym, d=row.definition, b=rec.meta.get("background", ""))
        assert rec.prompt == expected and "{" not in rec.prompt
        if "{b}" in template:
            assert rec.meta["background"] in scenes
            assert rec.prompt == f"{row.lemma}, {row.hypernym} inside {rec.meta['background']}"
        else:
            assert "background" not in rec.meta
        if "{d}" in template:
            assert rec.meta["definition"] == row.definition
    assert set(used) == set(ALL_TEMPLATES)  # every template drawn
    backgrounds = {sampler[i].meta.get("background") for i in range(400)} - {None}
    assert len(backgrounds) > 50  # backgrounds vary with the index


def test_wordnet_balanced_interleaved():
    sampler = build_sampler(recipe_from_dict(_recipe({"kind": "wordnet", "classes": "cifar10"}, count=95)))
    assert isinstance(sampler, WordNetSampler) and isinstance(sampler, PromptSampler)
    assert len(sampler) == 95
    assert sampler.class_names == "airplane automobile bird cat deer dog frog horse ship truck".split()
    labels = [sampler[i].label for i in range(95)]
    assert labels == [i % 10 for i in range(95)]
    for prefix in (10, 30, 90):
        assert set(Counter(labels[:prefix]).values()) == {prefix // 10}


def test_index_bounds():
    cfg = WordNetPrompts(classes="cifar10", templates=["{c}"])
    sampler = WordNetSampler(cfg, 5, 0)
    assert sampler[-1] == sampler[4]  # Python sequence semantics (check_index)
    for bad in (5, 6, -6, 10**9):
        with pytest.raises(IndexError):
            sampler[bad]
    comb = CombinatorialSampler(CombinatorialPrompts(), 3, 0)
    with pytest.raises(IndexError):
        comb[3]
    with pytest.raises(IndexError):
        comb.prompts_for([0, 3])


def _recipe(prompts: dict, count: int, seed: int = 0) -> dict:
    return {"name": "t", "seed": seed, "count": count, "prompts": prompts, "generator": {"model": "builtin:tiny-sd"}}


def _dump(indices):
    """The prompts of all three samplers at some indices, as plain data (compared across processes)."""
    samplers = [
        WordNetSampler(WordNetPrompts(classes="imagenet1k", templates=ALL_TEMPLATES), 50_000, 7),
        CaptionSampler(CaptionPrompts(source="cc3m-validation.txt", images_per_caption=6, shuffle=True), 60_000, 7),
        CombinatorialSampler(CombinatorialPrompts(), 1_000_000, 7),
    ]
    return [[[s[i].prompt, s[i].label, s[i].group, s[i].meta] for i in indices] for s in samplers]


INDICES = [0, 1, 2, 999, 12345, 49_999]


def test_same_seed_same_prompts_across_instances_and_order():
    forward = _dump(INDICES)
    assert forward == _dump(INDICES)  # two fresh instances
    backward = _dump(INDICES[::-1])
    assert forward == [rows[::-1] for rows in backward]  # index order does not matter
    other = WordNetSampler(WordNetPrompts(classes="imagenet1k", templates=ALL_TEMPLATES), 50_000, 8)
    assert [other[i].prompt for i in range(200)] != [
        WordNetSampler(WordNetPrompts(classes="imagenet1k", templates=ALL_TEMPLATES), 50_000, 7)[i].prompt
        for i in range(200)
    ]


def test_same_prompts_in_another_process():
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_prompts as t; "
        f"print(json.dumps(t._dump({INDICES!r})))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(_dump(INDICES)))


# --------------------------------------------------------------------------------------------------
# combinatorial sampler
# --------------------------------------------------------------------------------------------------
def test_combinatorial_distinct_and_reproducible():
    from synthgen.prompts.combinatorial import prompt_word

    count = 100_000
    a = CombinatorialSampler(CombinatorialPrompts(), count, seed=0)
    b = CombinatorialSampler(CombinatorialPrompts(), count, seed=0)
    c = CombinatorialSampler(CombinatorialPrompts(), count, seed=1)
    pa, pb, pc = a.prompts_for(range(count)), b.prompts_for(range(count)), c.prompts_for(range(count))
    # distinct combinations (the prompt text of two classes that share a word, e.g. the two
    # "Crane"s, is the same: prompts use plain category words, the label tells them apart)
    assert len({(p, a[i].label) for i, p in enumerate(pa[:20_000])}) == 20_000 and len(set(pa)) > count - 50
    assert pa == pb
    assert sum(x == y for x, y in zip(pa, pc)) < 10 and len(set(pa) & set(pc)) < 0.05 * count
    # the batch path and the one-at-a-time path agree
    for i in (0, 1, 77, 4242, 99_999):
        rec = a[i]
        assert rec.prompt == pa[i]
        assert rec.label == a.class_names.index(rec.meta["axes"]["category"]) and rec.label_name == rec.meta["axes"]["category"]
        assert rec.prompt == ", ".join(prompt_word(v) for v in rec.meta["axes"].values())
    assert [r.prompt for r in a.records(500, 520)] == pa[500:520]
    # random over the space: all categories, all values of the small axes
    assert len({p.split(", ")[0] for p in pa}) > 990
    assert len({p.split(", ")[-1] for p in pa}) == 10


def test_combinatorial_count_and_label_axis():
    with pytest.raises(RecipeError, match="9,600,000"):
        CombinatorialSampler(CombinatorialPrompts(), 9_600_001, 0)
    full = CombinatorialSampler(CombinatorialPrompts(), 9_600_000, 0)
    assert full[9_599_999].prompt
    unlabelled = CombinatorialSampler(CombinatorialPrompts(label_axis=None), 10, 0)
    assert unlabelled.class_names is None and unlabelled[0].label is None
    colors = CombinatorialSampler(CombinatorialPrompts(label_axis="color"), 10, 0)
    assert len(colors.class_names) == 12 and colors[3].label_name == colors[3].meta["axes"]["color"]
    with pytest.raises(RecipeError, match="not an axis"):
        CombinatorialSampler(CombinatorialPrompts(label_axis="shape"), 10, 0)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 17, 1000, 4097])
def test_keyed_permutation_is_a_bijection(size):
    perm = KeyedPermutation(size, ("test", size))
    scalar = [perm(i) for i in range(size)]
    assert sorted(scalar) == list(range(size))
    assert perm.many(range(size)).tolist() == scalar


def test_combinatorial_small_vocabulary_exhausted(tmp_path):
    vocab = tmp_path / "v.yaml"
    vocab.write_text("axes:\n  animal: [cat, dog, owl]\n  color: [red, blue]\n")
    sampler = CombinatorialSampler(CombinatorialPrompts(vocabulary=str(vocab), separator=" ", label_axis="animal"), 6, 4)
    assert sorted(r.prompt for r in sampler.records()) == sorted(f"{a} {c}" for a in ("cat", "dog", "owl") for c in ("red", "blue"))
    assert sampler.class_names == ["cat", "dog", "owl"]
    vocab.write_text("axes:\n  animal: [cat, cat]\n")
    with pytest.raises(SynthgenError, match="twice"):
        CombinatorialSampler(CombinatorialPrompts(vocabulary=str(vocab), label_axis=None), 1, 0)


# --------------------------------------------------------------------------------------------------
# caption sampler
# --------------------------------------------------------------------------------------------------
def test_cc3m_captions_shipped():
    captions = (PROMPTS_DIR / "cc3m-validation.txt").read_text(encoding="utf-8").splitlines()
    assert len(captions) == 15_833 and not any("\t" in c or "http" == c[:4] for c in captions)
    shared = SHARED / "cc3m-validation.tsv"
    if shared.is_file():
        raw = shared.read_text(encoding="utf-8").splitlines()
        assert captions == [line.split("\t", 1)[0].strip() for line in raw]


def test_captions_m_images_per_caption():
    m = 6
    sampler = build_sampler(
        recipe_from_dict(_recipe({"kind": "captions", "source": "cc3m-validation.txt", "images_per_caption": m}, count=600))
    )
    assert isinstance(sampler, CaptionSampler) and sampler.class_names is None and len(sampler) == 600
    by_group: dict[int, list] = {}
    for i in range(600):
        rec = sampler[i]
        by_group.setdefault(rec.group, []).append(rec)
        assert rec.meta["caption_index"] == i // m and rec.meta["copy"] == i % m and rec.label is None
    assert len(by_group) == 100
    for group, recs in by_group.items():
        assert len(recs) == m and len({r.prompt for r in recs}) == 1
        assert recs[0].prompt == sampler.captions[group]
    assert sampler[0].prompt == "author : a life in photography -- in pictures"


def test_captions_filters_and_formats(tmp_path):
    lines = ["a red  car", "  a red car ", "dog", "one two three four five six", "", "a blue bird", "a red car"]
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(lines) + "\n")
    base = dict(source=str(txt), images_per_caption=2)
    s = CaptionSampler(CaptionPrompts(**base), 8, 0)
    assert s.captions == ["a red car", "dog", "one two three four five six", "a blue bird"]  # first kept
    assert s.source_positions == [0, 2, 3, 5]
    s = CaptionSampler(CaptionPrompts(**base, dedup=False), 8, 0)
    assert s.captions.count("a red car") == 3
    s = CaptionSampler(CaptionPrompts(**base, min_words=2, max_words=5), 4, 0)
    assert s.captions == ["a red car", "a blue bird"]
    with pytest.raises(RecipeError, match="has 2 captions"):
        CaptionSampler(CaptionPrompts(**base, min_words=2, max_words=5), 5, 0)
    with pytest.raises(SynthgenError, match="no captions left"):
        CaptionSampler(CaptionPrompts(**base, min_words=50), 1, 0)
    missing = tmp_path / "nope.tsv"
    with pytest.raises(SynthgenError, match="nope.tsv"):
        CaptionSampler(CaptionPrompts(source=str(missing)), 1, 0)
    # TSV (first column), CSV and parquet (named column) give the same captions
    tsv = tmp_path / "c.tsv"
    tsv.write_text('a "quoted" cap\thttp://x/1.jpg\nsecond one\thttp://x/2.jpg\n')
    assert CaptionSampler(CaptionPrompts(source=str(tsv), images_per_caption=1), 2, 0).captions == ['a "quoted" cap', "second one"]
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('url,text\nhttp://x/1.jpg,"a, comma"\nhttp://x/2.jpg,plain\n')
    assert CaptionSampler(CaptionPrompts(source=str(csv_path), column="text", images_per_caption=1), 2, 0).captions == ["a, comma", "plain"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["x y", "z"], "n": [1, 2]}), tmp_path / "c.parquet")
    assert CaptionSampler(CaptionPrompts(source=str(tmp_path / "c.parquet"), images_per_caption=1), 2, 0).captions == ["x y", "z"]


def test_captions_shuffle_reproducible():
    cfg = CaptionPrompts(source="cc3m-validation.txt", images_per_caption=1, shuffle=True)
    a, b, c = CaptionSampler(cfg, 2000, 1), CaptionSampler(cfg, 2000, 1), CaptionSampler(cfg, 2000, 2)
    ga = [a[i].group for i in range(2000)]
    assert ga == [b[i].group for i in range(2000)]
    assert ga != [c[i].group for i in range(2000)]
    assert len(set(ga)) == 2000 and ga != list(range(2000))
    assert all(a[i].prompt == a.captions[ga[i]] for i in range(0, 2000, 97))


def test_captions_hub_offline_error():
    code = (
        "from synthgen.recipe import CaptionPrompts; from synthgen.prompts import CaptionSampler\n"
        "from synthgen.errors import SynthgenError\n"
        "try:\n CaptionSampler(CaptionPrompts(source='hf://datasets/synthgen-test/no-such-dataset'), 1, 0)\n"
        "except SynthgenError as e: print('ERR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("ERR")]
    assert line and "cannot load Hub dataset synthgen-test/no-such-dataset" in line[0]


# --------------------------------------------------------------------------------------------------
# WordNet: building tables from the local database
# --------------------------------------------------------------------------------------------------
@needs_wordnet
def test_build_class_table_matches_shipped(tmp_path):
    from synthgen.prompts.wordnet_db import lexnames_text, wordnet

    lex = lexnames_text().splitlines()
    assert len(lex) == 45 and lex[0] == "00\tadj.all\t3" and lex[5] == "05\tnoun.animal\t1" and lex[44] == "44\tadj.ppl\t3"
    shipped = {r.wnid: r for r in read_class_table(PROMPTS_DIR / "imagenet1k.tsv")}
    wnids = ["n01440764", "n01698640", "n02012849", "n03126707", "n03584254", "n04592741"]  # both cranes
    built = build_class_table(wnids)
    for row in built:
        assert row == shipped[row.wnid]
    # the copy lives in the cache, with the lexnames file Debian does not ship
    root = Path(str(wordnet().root))
    assert (root / "lexnames").read_text() == lexnames_text() and not (root / "data.noun").is_symlink()
    cifar = build_class_table([w for w, _ in CIFAR10], [n for _, n in CIFAR10])
    assert cifar == read_class_table(PROMPTS_DIR / "cifar10.tsv")
    # write -> read round trip
    path = write_class_table(cifar, tmp_path / "t.tsv")
    assert read_class_table(path) == cifar


@needs_wordnet
def test_unknown_wnid_and_wnid_list_classes(tmp_path):
    with pytest.raises(SynthgenError, match="n09999999"):
        build_class_table(["n01440764", "n09999999"])
    with pytest.raises(SynthgenError, match="n0144"):
        build_class_table(["n0144"])
    ids = tmp_path / "ids.txt"
    ids.write_text("# two classes\nn01440764\nn02084071 doggo\n")
    sampler = WordNetSampler(WordNetPrompts(classes=str(ids), templates=["{c}, {h}"]), 4, 0)
    assert sampler.class_names == ["tench", "doggo"]
    assert [sampler[i].prompt for i in range(4)] == ["tench, cyprinid", "dog, canine"] * 2
    ids.write_text("n01440764\nn00000042\n")
    with pytest.raises(SynthgenError, match="n00000042"):
        WordNetSampler(WordNetPrompts(classes=str(ids)), 4, 0)


def test_missing_tables_are_user_errors(tmp_path):
    with pytest.raises(SynthgenError, match="imagenet9k"):
        WordNetSampler(WordNetPrompts(classes="imagenet9k"), 1, 0)
    with pytest.raises(SynthgenError, match="background"):
        WordNetSampler(WordNetPrompts(classes="cifar10", backgrounds=str(tmp_path / "none.txt")), 1, 0)
    bad = tmp_path / "bad.tsv"
    bad.write_text("wnid\tname\tlemma\thypernym\tdefinition\nn01440764\ttench\n")
    with pytest.raises(SynthgenError, match="line 2"):
        WordNetSampler(WordNetPrompts(classes=str(bad)), 1, 0)
