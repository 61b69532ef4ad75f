"""A local WordNet 3.0 for nltk, without ``nltk.download``.

The shipped class tables in ``prompts/`` need no WordNet at run time; WordNet is only read to build
a table for new WordNet ids. ``nltk.download`` needs the network, so :func:`wordnet` finds a local
copy instead:

1. an nltk ``corpora/wordnet`` folder already on ``nltk.data.path`` / ``NLTK_DATA``; else
2. Debian's ``wordnet-base`` (``/usr/share/wordnet``; ``index.sense`` comes from
   ``wordnet-sense-index``), copied into ``cache_dir()/nltk_data/corpora/wordnet/`` (nltk reads
   only real folders, not symlinks) together with the ``lexnames`` file that Debian leaves out
   (45 fixed lines, see ``man 5 lexnames``); else
3. a :class:`~synthgen.errors.SynthgenError` telling the user to ``apt-get install wordnet-base``.

``SYNTHGEN_WORDNET_DIR`` may name another WordNet 3.0 ``dict`` folder to copy from.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

from synthgen.errors import SynthgenError
from synthgen.paths import cache_dir

#: Where Debian/Ubuntu's ``wordnet-base`` puts the WordNet 3.0 database.
SYSTEM_WORDNET_DIRS = (Path("/usr/share/wordnet"), Path("/usr/local/share/wordnet"))

#: The files nltk's WordNetCorpusReader reads (``index.sense`` is optional: sense keys only).
REQUIRED_FILES = (
    "data.noun",
    "data.verb",
    "data.adj",
    "data.adv",
    "index.noun",
    "index.verb",
    "index.adj",
    "index.adv",
    "noun.exc",
    "verb.exc",
    "adj.exc",
    "adv.exc",
)
OPTIONAL_FILES = ("index.sense", "cntlist.rev", "cntlist", "frames.vrb", "sents.vrb", "sentidx.vrb")

#: WordNet's 45 lexicographer files: number, name, syntactic category (1 noun, 2 verb, 3 adj, 4 adv).
#: From lexnames(5WN); Debian's wordnet-base does not ship this file, nltk requires it.
LEXNAMES = (
    ("adj.all", 3),
    ("adj.pert", 3),
    ("adv.all", 4),
    ("noun.Tops", 1),
    ("noun.act", 1),
    ("noun.animal", 1),
    ("noun.artifact", 1),
    ("noun.attribute", 1),
    ("noun.body", 1),
    ("noun.cognition", 1),
    ("noun.communication", 1),
    ("noun.event", 1),
    ("noun.feeling", 1),
    ("noun.food", 1),
    ("noun.group", 1),
    ("noun.location", 1),
    ("noun.motive", 1),
    ("noun.object", 1),
    ("noun.person", 1),
    ("noun.phenomenon", 1),
    ("noun.plant", 1),
    ("noun.possession", 1),
    ("noun.process", 1),
    ("noun.quantity", 1),
    ("noun.relation", 1),
    ("noun.shape", 1),
    ("noun.state", 1),
    ("noun.substance", 1),
    ("noun.time", 1),
    ("verb.body", 2),
    ("verb.change", 2),
    ("verb.cognition", 2),
    ("verb.communication", 2),
    ("verb.competition", 2),
    ("verb.consumption", 2),
    ("verb.contact", 2),
    ("verb.creation", 2),
    ("verb.emotion", 2),
    ("verb.motion", 2),
    ("verb.perception", 2),
    ("verb.possession", 2),
    ("verb.social", 2),
    ("verb.stative", 2),
    ("verb.weather", 2),
    ("adj.ppl", 3),
)

_LOCK = threading.Lock()
_READER = None


def lexnames_text() -> str:
    """The ``lexnames`` file: ``NN<TAB>name<TAB>category`` for the 45 lexicographer files."""
    return "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(LEXNAMES))


def local_wordnet_dir() -> Path:
    """The folder ``wordnet()`` loads (copying the system WordNet into the cache if needed)."""
    found = _nltk_wordnet_dir()
    if found is not None:
        return found
    source = system_wordnet_dir()
    if source is None:
        raise SynthgenError(
            "no local WordNet 3.0 found (needed to build a class table for new WordNet ids): "
            "install it with `apt-get install wordnet-base wordnet-sense-index`, "
            "or set SYNTHGEN_WORDNET_DIR to a WordNet 3.0 dict folder"
        )
    return _copy_to_cache(source)


def system_wordnet_dir() -> Optional[Path]:
    """A WordNet 3.0 ``dict`` folder on this machine (``SYNTHGEN_WORDNET_DIR`` or Debian's), or None."""
    candidates = []
    if os.environ.get("SYNTHGEN_WORDNET_DIR"):
        candidates.append(Path(os.environ["SYNTHGEN_WORDNET_DIR"]))
    candidates.extend(SYSTEM_WORDNET_DIRS)
    for folder in candidates:
        if all((folder / name).is_file() for name in REQUIRED_FILES):
            return folder
    return None


def _nltk_wordnet_dir() -> Optional[Path]:
    """An unzipped ``corpora/wordnet`` on nltk's data path (e.g. from an earlier nltk.download)."""
    import nltk

    try:
        pointer = nltk.data.find("corpora/wordnet")
    except LookupError:
        return None
    path = Path(str(getattr(pointer, "path", pointer)))
    if path.is_dir() and all((path / n).is_file() for n in REQUIRED_FILES + ("lexnames",)):
        return path
    return None


def _copy_to_cache(source: Path) -> Path:
    root = cache_dir() / "nltk_data"
    target = root / "corpora" / "wordnet"
    if all((target / n).is_file() for n in REQUIRED_FILES + ("lexnames",)):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Copy into a temporary folder, then rename: concurrent processes never see a half copy.
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    try:
        for name in REQUIRED_FILES + OPTIONAL_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)  # a real copy: nltk rejects symlinks
        if (source / "lexnames").is_file():
            shutil.copyfile(source / "lexnames", tmp / "lexnames")
        else:
            (tmp / "lexnames").write_text(lexnames_text())
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "lexnames").is_file():  # not another process winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def wordnet():
    """An nltk ``WordNetCorpusReader`` on a local WordNet 3.0 (loaded once per process)."""
    global _READER
    with _LOCK:
        if _READER is None:
            _READER = _load(local_wordnet_dir())
        return _READER


def _load(folder: Path):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class LocalWordNetReader(WordNetCorpusReader):
        # nltk 3.10 builds a WordNet-to-WordNet synset map at start-up (for the multilingual
        # Open Multilingual Wordnet), re-reading index.sense through nltk.data; synthgen needs
        # none of that, and it fails when that lookup finds no `corpora/wordnet`.
        def map_wn(self, version="wordnet"):
            return None

    # So that nltk.corpus.wordnet in this process finds the same copy.
    data_root = str(folder.parent.parent)
    if folder.parent.name == "corpora" and data_root not in nltk.data.path:
        nltk.data.path.append(data_root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        try:
            reader = LocalWordNetReader(str(folder), None)
        except (OSError, ValueError, AssertionError) as exc:
            raise SynthgenError(f"cannot read the WordNet database in {folder}: {exc}") from None
    version = reader.get_version()
    if version != "3.0":
        raise SynthgenError(
            f"the WordNet in {folder} is version {version}; ImageNet ids are WordNet 3.0 offsets"
        )
    return reader


def synset_line(reader, wnid: str) -> str:
    """The raw ``data.<pos>`` line of a synset (pointers in file order, unlike nltk's sets)."""
    pos, offset = wnid[0], int(wnid[1:])
    filename = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "s": "data.adj", "r": "data.adv"}[pos]
    with open(Path(str(reader.root)) / filename, "rb") as fh:
        fh.seek(offset)
        return fh.readline().decode("utf-8")
