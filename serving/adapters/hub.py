"""Start-up adapters given as hub ids (TGI's ``LORA_ADAPTERS=predibase/customer_support``), fetched to a folder.

A local folder always wins; anything else shaped like ``owner/name`` (optionally ``owner/name@revision``) is read
from the hub cache when it is there (no network needed, e.g. after ``hf download``), and downloaded otherwise with
``huggingface_hub.snapshot_download``, into ``--huggingface-hub-cache`` when given.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .store import AdapterError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json", "*.md"]


def is_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and not Path(spec).expanduser().exists()


def adapter_folder(spec: str, cache_dir: Optional[str] = None) -> str:
    """The local folder for ``spec``: itself when it is a path, else the hub snapshot of that repo."""
    if not is_hub_id(spec):
        return spec
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    kwargs = dict(repo_id=repo_id, revision=revision or None, cache_dir=cache_dir, allow_patterns=ADAPTER_FILES)
    try:
        return snapshot_download(**kwargs, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    try:
        return snapshot_download(**kwargs)
    except Exception as err:  # noqa: BLE001 - any failure to fetch is this one start-up error, not a traceback
        raise AdapterError(
            f"adapter {spec!r} is not a folder here, and as a hub id it is neither in the hub cache nor "
            f"downloadable: {err}"
        ) from None
