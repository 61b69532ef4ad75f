"""Class tables, background lists and the combinatorial vocabulary shipped in ``prompts/``.

A class table is a TSV file with a header line::

    wnid<TAB>name<TAB>lemma<TAB>hypernym<TAB>definition

- ``wnid``: WordNet 3.0 id (``n`` + 8-digit offset, the ImageNet synset id);
- ``name``: the label name stored in the dataset (unique within the table);
- ``lemma``: the class name a prompt uses as ``{c}`` (the synset's first lemma, ``_`` -> space);
- ``hypernym``: ``{h}``, the first lemma of the synset's first hypernym (first ``@`` pointer in
  WordNet's data file; the first instance hypernym ``@i`` when there is none), ``_`` -> space;
- ``definition``: ``{d}``, the WordNet gloss without its examples, kept whole. CLIP's text encoder
  (Stable Diffusion's) truncates prompts at 77 tokens, so a long definition is cut there by the
  pipeline, not here.

Label names default to the lemma; lemmas that occur more than once in a table, ignoring case
(ImageNet-1K has two ``crane`` and two ``maillot`` synsets, and ``Cardigan`` the corgi beside
``cardigan`` the sweater) get their hypernym appended, ``crane (wading bird)``, and the wnid if
that is still ambiguous.

Regenerate the shipped files (the WordNet columns come from the local WordNet 3.0, the ImageNet-1K
order from timm's ``ImageNetInfo``)::

    python -m synthgen.prompts.tables \\
        --imagenet100 ../shared/prompts-data/imagenet100.txt \\
        --places365 ../shared/prompts-data/places365_categories.txt \\
        --cc3m ../shared/prompts-data/cc3m-validation.tsv

Without ``--imagenet100`` the wnids of the existing ``prompts/imagenet100.tsv`` are reused; without
``--places365``/``--cc3m`` those two files are left as they are.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from synthgen.errors import SynthgenError
from synthgen.paths import PROMPTS_DIR

TABLE_HEADER = ("wnid", "name", "lemma", "hypernym", "definition")
WNID_RE = re.compile(r"^[nvasr]\d{8}$")

#: CIFAR-10 label names in label order, and the WordNet 3.0 synset each one is mapped to.
CIFAR10 = (
    ("n02691156", "airplane"),  # airplane, aeroplane, plane
    ("n02958343", "automobile"),  # car, auto, automobile, machine, motorcar
    ("n01503061", "bird"),
    ("n02121808", "cat"),  # domestic cat, house cat, Felis domesticus
    ("n02430045", "deer"),  # deer, cervid
    ("n02084071", "dog"),  # dog, domestic dog, Canis familiaris
    ("n01639765", "frog"),  # frog, toad, toad frog, anuran, batrachian, salientian
    ("n02374451", "horse"),  # horse, Equus caballus
    ("n04194289", "ship"),
    ("n04490091", "truck"),  # truck, motortruck
)


@dataclass(frozen=True)
class ClassInfo:
    wnid: str
    name: str
    lemma: str
    hypernym: str
    definition: str


# --------------------------------------------------------------------------------------------------
# finding data files
# --------------------------------------------------------------------------------------------------
def resolve_data_file(value: str, what: str, suffixes: Sequence[str] = ()) -> Path:
    """A file named in a recipe: a path (relative ones against the current folder first, then
    ``prompts/``) or the name of a file shipped in ``prompts/`` without its suffix (``places365``).
    """
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, PROMPTS_DIR / path]
    if not path.is_absolute() and not path.suffix:
        candidates += [PROMPTS_DIR / f"{value}{suffix}" for suffix in suffixes]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shipped = sorted({p.stem for s in suffixes for p in PROMPTS_DIR.glob(f"*{s}")})
    hint = f" (shipped: {', '.join(shipped)})" if shipped else ""
    raise SynthgenError(f"{what} not found: {value!r} is neither a file nor a name shipped in {PROMPTS_DIR}{hint}")


# --------------------------------------------------------------------------------------------------
# class tables
# --------------------------------------------------------------------------------------------------
def _parse_synset_line(line: str) -> tuple[list[str], list[tuple[str, str, str]], str]:
    """(lemmas, pointers (symbol, offset, pos), gloss) of a ``data.<pos>`` line."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    n_words = int(fields[3], 16)
    words = [fields[4 + 2 * k] for k in range(n_words)]
    at = 4 + 2 * n_words
    n_ptrs = int(fields[at])
    pointers = [tuple(fields[at + 1 + 4 * k : at + 4 + 4 * k]) for k in range(n_ptrs)]
    return words, pointers, gloss.strip()  # type: ignore[return-value]


def _clean_lemma(word: str) -> str:
    word = re.sub(r"\((a|p|ip)\)$", "", word)  # adjective syntactic markers
    return word.replace("_", " ")


def wordnet_entry(reader, wnid: str) -> tuple[str, str, str]:
    """(lemma, hypernym, definition) of a WordNet 3.0 id; SynthgenError when there is no such id."""
    from synthgen.prompts.wordnet_db import synset_line

    if not WNID_RE.match(wnid):
        raise SynthgenError(f"malformed WordNet id {wnid!r}: expected a letter and 8 digits (n01440764)")
    line = synset_line(reader, wnid)
    if not line.startswith(wnid[1:] + " "):
        raise SynthgenError(f"unknown WordNet id {wnid!r}: no such synset in WordNet 3.0")
    pos = wnid[0]
    synset = reader.synset_from_pos_and_offset(pos if pos != "s" else "a", int(wnid[1:]))
    words, pointers, _ = _parse_synset_line(line)
    lemma = _clean_lemma(words[0])
    hypernym = ""
    for symbol in ("@", "@i"):
        target = next(((off, p) for sym, off, p in pointers if sym == symbol), None)
        if target is not None:
            parent = reader.synset_from_pos_and_offset(target[1], int(target[0]))
            hypernym = _clean_lemma(parent.lemma_names()[0])
            break
    return lemma, hypernym, synset.definition().strip()


def build_class_table(
    wnids: Sequence[str], names: Optional[Sequence[Optional[str]]] = None
) -> list[ClassInfo]:
    """Class rows for WordNet ids, read from the local WordNet 3.0 (see ``wordnet_db``).

    ``names`` (optional, same length) sets label names; missing ones default to the lemma, made
    unique as the module docstring says. Unknown or duplicated ids raise SynthgenError.
    """
    from synthgen.prompts.wordnet_db import wordnet

    wnids = [w.strip() for w in wnids]
    if not wnids:
        raise SynthgenError("no WordNet ids given")
    seen: set[str] = set()
    for w in wnids:
        if w in seen:
            raise SynthgenError(f"WordNet id {w} is listed twice")
        seen.add(w)
    if names is not None and len(names) != len(wnids):
        raise SynthgenError(f"{len(names)} names for {len(wnids)} WordNet ids")
    reader = wordnet()
    entries = [wordnet_entry(reader, w) for w in wnids]
    given = list(names) if names is not None else [None] * len(wnids)
    label_names = _unique_names(
        [g or lemma for g, (lemma, _, _) in zip(given, entries)],
        [h for _, h, _ in entries],
        wnids,
        fixed=[g is not None for g in given],
    )
    return [
        ClassInfo(w, n, lemma, h, d) for w, n, (lemma, h, d) in zip(wnids, label_names, entries)
    ]


def _unique_names(names: list[str], hypernyms: list[str], wnids: list[str], fixed: list[bool]) -> list[str]:
    """Disambiguate names that clash, ignoring case (``Cardigan`` the corgi, ``cardigan`` the sweater)."""
    from collections import Counter

    def clashes(values: list[str]) -> Counter:
        return Counter(v.casefold() for v in values)

    counts = clashes(names)
    out = [
        n if counts[n.casefold()] == 1 or f or not h else f"{n} ({h})"
        for n, h, f in zip(names, hypernyms, fixed)
    ]
    counts = clashes(out)
    out = [n if counts[n.casefold()] == 1 or f else f"{n} ({w})" for n, w, f in zip(out, wnids, fixed)]
    dup = [n for n, c in clashes(out).items() if c > 1]
    if dup:
        raise SynthgenError(f"label name {dup[0]!r} is given to more than one class")
    return out


def _check_cell(value: str, what: str) -> str:
    if "\t" in value or "\n" in value or "\r" in value:
        raise SynthgenError(f"{what} {value!r} contains a tab or newline; a class table cannot store it")
    return value


def write_class_table(rows: Iterable[ClassInfo], path: str | Path) -> Path:
    """Write rows as a class-table TSV (header first, UTF-8, ``\\n`` line ends)."""
    path = Path(path)
    lines = ["\t".join(TABLE_HEADER)]
    for row in rows:
        lines.append("\t".join(_check_cell(v, f) for v, f in zip(astuple(row), TABLE_HEADER)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_class_table(path: str | Path) -> list[ClassInfo]:
    """Read and check a class-table TSV (header, five columns, unique wnids and names)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SynthgenError(f"class table not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SynthgenError(f"cannot read class table {path}: {exc}") from None
    lines = text.splitlines()
    if not lines or tuple(lines[0].split("\t")) != TABLE_HEADER:
        raise SynthgenError(f"{path}: a class table starts with the header {' '.join(TABLE_HEADER)} (tab-separated)")
    rows: list[ClassInfo] = []
    wnids: set[str] = set()
    names: set[str] = set()
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(TABLE_HEADER):
            raise SynthgenError(f"{path}, line {number}: expected 5 tab-separated columns, found {len(cells)}")
        row = ClassInfo(*(c.strip() for c in cells))
        if not row.wnid or not row.name or not row.lemma:
            raise SynthgenError(f"{path}, line {number}: wnid, name and lemma must not be empty")
        if row.wnid in wnids:
            raise SynthgenError(f"{path}, line {number}: WordNet id {row.wnid} is listed twice")
        if row.name in names:
            raise SynthgenError(f"{path}, line {number}: label name {row.name!r} is listed twice")
        wnids.add(row.wnid)
        names.add(row.name)
        rows.append(row)
    if not rows:
        raise SynthgenError(f"{path}: the class table has no classes")
    return rows


def read_wnid_list(path: str | Path) -> tuple[list[str], list[Optional[str]]]:
    """A text file of WordNet ids, one a line, optionally followed by a label name.

    Blank lines and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SynthgenError(f"WordNet id list not found: {path}") from None
    wnids: list[str] = []
    names: list[Optional[str]] = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if not WNID_RE.match(parts[0]):
            raise SynthgenError(f"{path}, line {number}: {parts[0]!r} is not a WordNet id (like n01440764)")
        wnids.append(parts[0])
        names.append(parts[1].strip() if len(parts) > 1 else None)
    if not wnids:
        raise SynthgenError(f"{path}: no WordNet ids")
    return wnids, names


# --------------------------------------------------------------------------------------------------
# backgrounds (Places365)
# --------------------------------------------------------------------------------------------------
#: Places365 names whose mechanical rewrite reads badly (typos in the original names fixed too).
SCENE_OVERRIDES = {
    "bakery/shop": "bakery shop",
    "elevator/door": "elevator door",
    "desert/vegetation": "desert with vegetation",
    "moat/water": "moat with water",
    "subway_station/platform": "subway station platform",
    "train_station/platform": "train station platform",
    "temple/asia": "asian temple",
    "underwater/ocean_deep": "deep ocean underwater",
    "apartment_building_outdoor": "outdoor apartment building",
    "mountain_snowy": "snowy mountain",
    "archaelogical_excavation": "archaeological excavation",
    "kindergarden_classroom": "kindergarten classroom",
    "childs_room": "child's room",
    "butchers_shop": "butcher's shop",
    "artists_loft": "artist's loft",
    "veterinarians_office": "veterinarian's office",
    "fastfood_restaurant": "fast food restaurant",
}


def readable_scene(raw: str) -> str:
    """A Places365 category as words: ``/a/arena/hockey`` -> ``hockey arena``.

    The ``/x/`` prefix is dropped, ``_`` becomes a space, and a sub-category ``place/kind`` becomes
    ``kind place`` (``church/indoor`` -> ``indoor church``), except the few in SCENE_OVERRIDES.
    """
    name = raw.strip()
    name = re.sub(r"^/[a-z]/", "", name)
    if name in SCENE_OVERRIDES:
        return SCENE_OVERRIDES[name]
    if "/" in name:
        place, kind = name.split("/", 1)
        name = f"{kind} {place}"
    return name.replace("_", " ").replace("/", " ")


def read_places365_categories(path: str | Path) -> list[str]:
    """Raw names of ``places365_categories.txt`` (``name index`` lines) in index order."""
    entries = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            name, index = line.rsplit(None, 1)
            entries.append((int(index), name))
    entries.sort()
    if [i for i, _ in entries] != list(range(len(entries))):
        raise SynthgenError(f"{path}: indices are not 0..{len(entries) - 1}")
    return [n for _, n in entries]


def read_text_list(path: str | Path, what: str = "list") -> list[str]:
    """Non-empty lines of a text file; ``#`` starts a comment line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SynthgenError(f"{what} not found: {path}") from None
    items = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not items:
        raise SynthgenError(f"{path}: the {what} is empty")
    return items


# --------------------------------------------------------------------------------------------------
# combinatorial vocabulary (Mormille & Atsumi)
# --------------------------------------------------------------------------------------------------
# The paper gives the axis sizes (1000 x 8 x 12 x 10 x 10) and two prompts ("American Alligator,
# Small, Gray, Left-Side View, Twilight"; "Castle, Big, White, From Above, Daytime") but not the
# lists; these lists are ours, containing every word of those examples.
SIZES = ["Tiny", "Small", "Medium", "Big", "Large", "Huge", "Giant", "Miniature"]
COLORS = ["Red", "Orange", "Yellow", "Green", "Blue", "Purple", "Pink", "Brown", "Black", "White", "Gray", "Silver"]
VIEWS = [
    "Front View",
    "Rear View",
    "Left-Side View",
    "Right-Side View",
    "From Above",
    "From Below",
    "Close-Up",
    "Far Away",
    "Three-Quarter View",
    "Eye-Level View",
]
ILLUMINATIONS = [
    "Daytime",
    "Twilight",
    "Night",
    "Sunrise",
    "Sunset",
    "Overcast",
    "Bright Sunlight",
    "Studio Lighting",
    "Candlelight",
    "Backlit",
]


def title_case(text: str) -> str:
    """Capitalise each lower-case word: ``jack-o'-lantern`` -> ``Jack-O'-Lantern``; ``iPod`` stays."""

    def word(match: re.Match) -> str:
        w = match.group(0)
        if any(ch.isupper() for ch in w):
            return w
        return re.sub(r"[a-z]", lambda m: m.group(0).upper(), w, count=1)

    return re.sub(r"[^\s\-]+", word, text)


def combinatorial_vocabulary(categories: Sequence[str]) -> str:
    """The YAML text of ``prompts/combinatorial.yaml`` (axes in prompt order)."""
    import yaml

    header = (
        "# Mormille & Atsumi combinatorial prompt space: one value per axis, joined in this order.\n"
        "# category: the 1,000 ImageNet-1K label names of prompts/imagenet1k.tsv in Title Case.\n"
        "# Generated by `python -m synthgen.prompts.tables`.\n"
    )
    data = {
        "axes": {
            "category": list(categories),
            "size": SIZES,
            "color": COLORS,
            "view": VIEWS,
            "illumination": ILLUMINATIONS,
        }
    }
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


# --------------------------------------------------------------------------------------------------
# regeneration
# --------------------------------------------------------------------------------------------------
def imagenet1k_wnids() -> list[str]:
    """The 1,000 ImageNet-1K wnids in the standard class-index order (from timm)."""
    from timm.data import ImageNetInfo

    wnids = list(ImageNetInfo("imagenet-1k").label_names())
    if len(wnids) != 1000:
        raise SynthgenError(f"timm lists {len(wnids)} ImageNet-1K classes, expected 1000")
    return wnids


def regenerate(
    out_dir: Path = PROMPTS_DIR,
    imagenet100: Optional[Path] = None,
    places365: Optional[Path] = None,
    cc3m: Optional[Path] = None,
) -> list[Path]:
    written = []
    in1k = build_class_table(imagenet1k_wnids())
    written.append(write_class_table(in1k, out_dir / "imagenet1k.tsv"))

    if imagenet100 is not None:
        wnids100, names100 = read_wnid_list(imagenet100)
    else:
        old = read_class_table(out_dir / "imagenet100.tsv")
        wnids100, names100 = [r.wnid for r in old], [None] * len(old)
    written.append(write_class_table(build_class_table(wnids100, names100), out_dir / "imagenet100.tsv"))

    cifar = build_class_table([w for w, _ in CIFAR10], [n for _, n in CIFAR10])
    written.append(write_class_table(cifar, out_dir / "cifar10.tsv"))

    categories = [title_case(r.name) for r in in1k]
    if len(set(c.lower() for c in categories)) != len(categories):
        raise SynthgenError("combinatorial categories are not unique")
    path = out_dir / "combinatorial.yaml"
    path.write_text(combinatorial_vocabulary(categories), encoding="utf-8")
    written.append(path)

    if places365 is not None:
        scenes = [readable_scene(n) for n in read_places365_categories(places365)]
        if len(set(scenes)) != len(scenes):
            raise SynthgenError("readable Places365 names are not unique")
        path = out_dir / "places365.txt"
        path.write_text("\n".join(scenes) + "\n", encoding="utf-8")
        written.append(path)

    if cc3m is not None:
        captions = []
        for line in Path(cc3m).read_text(encoding="utf-8").splitlines():
            caption = line.split("\t", 1)[0].strip()
            if caption:
                captions.append(caption)
        path = out_dir / "cc3m-validation.txt"
        path.write_text("\n".join(captions) + "\n", encoding="utf-8")
        written.append(path)
    return written


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m synthgen.prompts.tables", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=PROMPTS_DIR, help="folder to write (default: prompts/)")
    parser.add_argument("--imagenet100", type=Path, help="text file of the 100 ImageNet-100 wnids")
    parser.add_argument("--places365", type=Path, help="places365_categories.txt (name index lines)")
    parser.add_argument("--cc3m", type=Path, help="CC3M validation TSV (caption<TAB>url)")
    args = parser.parse_args(argv)
    try:
        for path in regenerate(args.out, args.imagenet100, args.places365, args.cc3m):
            print(f"wrote {path}")
    except SynthgenError as exc:
        raise SystemExit(f"error: {exc}")


if __name__ == "__main__":
    main()
