"""Things built once and kept on disk under ``.cache/flora-hf/<name>``: the tiny code model, the tiny Whisper and its
synthetic speech folders.

A cached folder is complete or absent: it is written under a staging name next to its place and moved there in one
step, so a crash (or a concurrent build) never leaves a folder that looks finished. Folder names and build records
carry a fingerprint of everything that determined them, so a changed spec or corpus is rebuilt, not reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from trainers import REPO_ROOT

INFO_FILE = "build_info.json"
"""The build record written into every cached model folder (spec, data, pretraining losses, build time)."""


def cache_root() -> Path:
    """``$FLORA_HF_CACHE``, else ``<repo>/.cache/flora-hf`` (gitignored)."""
    root = os.environ.get("FLORA_HF_CACHE")
    return Path(root).expanduser() if root else REPO_ROOT / ".cache" / "flora-hf"


def fingerprint(*parts: object) -> str:
    """12 hex digits of SHA-256 over ``parts`` as sorted JSON (non-JSON values by ``str``): a cache key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_build_info(folder: Path) -> Optional[dict[str, Any]]:
    """The build record of a cached folder, or None when there is none (not built, or unreadable)."""
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """A staging path next to ``folder`` (not created) for the caller to fill; when the block ends it replaces
    ``folder`` in one move, and when the block raises it is removed. If another process moved its own build into
    place first, that one is kept: it was built from the same inputs."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    try:
        os.replace(staging, folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def save_build(folder: Path, parts: Iterable[Any], info: dict[str, Any]) -> None:
    """Save each of ``parts`` (model, tokenizer, feature extractor: anything with ``save_pretrained``) and the build
    record ``info`` into ``folder``, staged. The parts then name ``folder`` as where they come from, exactly as
    when a later run loads them from it (PEFT records it as the adapter's ``base_model_name_or_path``)."""
    parts = list(parts)
    with staged_folder(folder) as staging:
        for part in parts:
            part.save_pretrained(staging)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=1))
    for part in parts:
        if hasattr(part, "name_or_path"):
            part.name_or_path = str(folder)
        config = getattr(part, "config", None)
        if config is not None and hasattr(config, "name_or_path"):
            config.name_or_path = str(folder)
