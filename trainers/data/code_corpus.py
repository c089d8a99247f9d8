"""Source code every Debian-like machine with Python already has, split per language for tiny offline demos.

The demos cannot download data (no hub access on development machines), so they train on what is installed: the
running interpreter's standard library, Perl's modules, C headers and shell scripts in ``/usr/bin``. Sampling is
seeded and files are sorted before shuffling, so the same machine always yields the same split, and the split is
by file so held-out text shares no file with training text.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

DEFAULT_LANGUAGE_ORDER = ("python", "perl", "c", "shell")
"""Preference order when the machine has more languages than the caller wants."""

_SHELL_SHEBANG = re.compile(rb"^#!\s*\S*/(?:env\s+)?(?:ba|da|k|z)?sh\b")


@dataclass(frozen=True)
class SourceFile:
    path: str
    text: str


@dataclass
class LanguageCorpus:
    """One language's sampled files; ``train`` and ``heldout`` never share a file."""

    language: str
    train: list[SourceFile] = field(default_factory=list)
    heldout: list[SourceFile] = field(default_factory=list)

    @property
    def train_texts(self) -> list[str]:
        return [f.text for f in self.train]

    @property
    def heldout_texts(self) -> list[str]:
        return [f.text for f in self.heldout]

    @property
    def train_bytes(self) -> int:
        return sum(len(f.text.encode()) for f in self.train)

    @property
    def heldout_bytes(self) -> int:
        return sum(len(f.text.encode()) for f in self.heldout)


# ------------------------------------------------------------------------------------------------ file finders
def _unique_files(paths: Iterable[Path]) -> list[Path]:
    """Regular files, deduplicated through symlinks (Debian links e.g. ``perl/5.36 -> 5.36.0``), sorted."""
    seen: dict[Path, Path] = {}
    for p in paths:
        try:
            if not p.is_file():
                continue
            real = p.resolve()
        except OSError:
            continue
        seen.setdefault(real, real)
    return sorted(seen)


def _rglob_many(roots: Iterable[Path], patterns: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for root in roots:
        if root.is_dir():
            for pattern in patterns:
                found.extend(root.rglob(pattern))
    return found


def python_files() -> list[Path]:
    """The running interpreter's standard library. Third-party packages and the test suite (a separate package on
    Debian) vary by machine, so they are left out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    return _unique_files(p for p in _rglob_many([stdlib], ["*.py"]) if not skip & set(p.relative_to(stdlib).parts))


def perl_files() -> list[Path]:
    """Perl modules and scripts wherever Debian and friends install them, whatever the Perl version."""
    patterns = [
        "/usr/share/perl*",
        "/usr/lib/perl*",
        "/usr/lib/*/perl*",
        "/usr/local/share/perl*",
        "/usr/local/lib/*/perl*",
    ]
    roots = sorted({Path(p) for pattern in patterns for p in glob.glob(pattern)})
    return _unique_files(_rglob_many(roots, ["*.pm", "*.pl"]))


def c_files() -> list[Path]:
    """C headers; the C++ standard library's headers are a different language and are skipped."""
    return _unique_files(p for p in _rglob_many([Path("/usr/include")], ["*.h"]) if "c++" not in p.parts)


def shell_files() -> list[Path]:
    """Executables in the usual bin folders whose shebang names a Bourne-family shell."""
    found: list[Path] = []
    for folder in ("/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"):
        root = Path(folder)
        if not root.is_dir():
            continue
        for p in root.iterdir():
            try:
                with p.open("rb") as fh:
                    head = fh.read(128)
            except OSError:
                continue
            if _SHELL_SHEBANG.match(head):
                found.append(p)
    return _unique_files(found)


def folder_files(folder: Path) -> list[Path]:
    """Every file under a user's folder, hidden folders (``.git``) excluded; binaries are dropped when read."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"source folder {folder} does not exist")
    return _unique_files(
        p for p in folder.rglob("*") if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


BUILTIN_FINDERS: dict[str, Callable[[], list[Path]]] = {
    "python": python_files,
    "perl": perl_files,
    "c": c_files,
    "shell": shell_files,
}


# ---------------------------------------------------------------------------------------------------- sampling
def read_source(path: Path, max_bytes: int) -> Optional[str]:
    """The file as text, cut at a line end after ``max_bytes`` (long files would crowd out the others), or None
    for binary or non-UTF-8 files."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(max_bytes + 4096)
    except OSError:
        return None
    if b"\0" in raw:
        return None
    if len(raw) > max_bytes:
        cut = raw.rfind(b"\n", 0, max_bytes)
        raw = raw[: cut + 1 if cut > 0 else max_bytes]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def sample_language(
    language: str,
    files: Sequence[Path],
    train_bytes: int,
    heldout_bytes: int,
    seed: int = 0,
    max_file_bytes: int = 12_000,
    min_file_bytes: int = 200,
) -> LanguageCorpus:
    """Seeded shuffle of the sorted files; held-out is filled first, then train, each up to its byte cap."""
    order = sorted(Path(f) for f in files)
    random.Random(f"{seed}:{language}").shuffle(order)
    corpus = LanguageCorpus(language)
    held, train = 0, 0
    for path in order:
        if held >= heldout_bytes and train >= train_bytes:
            break
        text = read_source(path, max_file_bytes)
        if text is None or len(text.encode()) < min_file_bytes:
            continue
        size = len(text.encode())
        if held < heldout_bytes:
            corpus.heldout.append(SourceFile(str(path), text))
            held += size
        else:
            corpus.train.append(SourceFile(str(path), text))
            train += size
    return corpus


def find_code_corpus(
    languages: Optional[Sequence[str]] = None,
    source_dirs: Optional[Mapping[str, Path | str]] = None,
    train_bytes: int = 1_500_000,
    heldout_bytes: int = 60_000,
    min_bytes: int = 200_000,
    max_languages: Optional[int] = 3,
    seed: int = 0,
    max_file_bytes: int = 12_000,
) -> dict[str, LanguageCorpus]:
    """Per-language train/held-out files, for the languages that have at least ``min_bytes`` of text.

    ``source_dirs`` maps a language name to a folder of its files (any language, not just the built-in ones) and
    overrides the built-in finder of the same name. ``languages`` picks and orders candidates; by default the
    folders given, else the built-in order. Languages with too little text are skipped, then the first
    ``max_languages`` are kept.
    """
    if train_bytes + heldout_bytes < min_bytes:
        raise ValueError(f"train_bytes + heldout_bytes ({train_bytes + heldout_bytes}) < min_bytes ({min_bytes})")
    finders: dict[str, Callable[[], list[Path]]] = dict(BUILTIN_FINDERS)
    for name, folder in (source_dirs or {}).items():
        finders[name] = lambda folder=folder: folder_files(Path(folder))
    if languages is None:
        languages = list(source_dirs) if source_dirs else list(DEFAULT_LANGUAGE_ORDER)
    unknown = [lang for lang in languages if lang not in finders]
    if unknown:
        raise ValueError(f"no source files known for {unknown}; pass a folder for them in source_dirs")

    found: dict[str, LanguageCorpus] = {}
    for lang in languages:
        if max_languages is not None and len(found) >= max_languages:
            break
        corpus = sample_language(lang, finders[lang](), train_bytes, heldout_bytes, seed, max_file_bytes)
        if corpus.train and corpus.heldout and corpus.train_bytes + corpus.heldout_bytes >= min_bytes:
            found[lang] = corpus
    return found


def corpus_fingerprint(corpus: Mapping[str, LanguageCorpus]) -> str:
    """Changes whenever any language's split changes, so a cached model is never evaluated on its training text."""
    h = hashlib.sha256()
    for lang, lc in corpus.items():
        for split, files in (("train", lc.train), ("heldout", lc.heldout)):
            for f in files:
                h.update(f"{lang}\0{split}\0{f.path}\0".encode())
                h.update(hashlib.sha256(f.text.encode()).digest())
    return h.hexdigest()[:16]


def pack_blocks(docs: Iterable[Sequence[int]], block_size: int, sep_id: Optional[int] = None) -> torch.Tensor:
    """Concatenate token id lists (each followed by ``sep_id``) into ``(n, block_size)`` rows, dropping the tail.

    Fixed-length rows need no padding or attention mask, so every position of every row counts in the loss.
    """
    flat: list[int] = []
    for doc in docs:
        flat.extend(doc)
        if sep_id is not None:
            flat.append(sep_id)
    n = len(flat) // block_size
    return torch.tensor(flat[: n * block_size], dtype=torch.long).view(n, block_size)


@functools.lru_cache(maxsize=4)
def builtin_code_corpus(seed: int = 0) -> dict[str, LanguageCorpus]:
    """The demo's corpus (this machine's python/perl/c files), the one the tiny code model is cached for."""
    return find_code_corpus(seed=seed)
