"""The Hugging Face hub as the trainers meet it: whether it is switched off or reachable, whether a model is cached,
and loading hub datasets with errors a user can act on.

``datasets`` is imported only here and only when a hub dataset is asked for, so local folders and the tests work
without it. Without network (or with ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``) ``datasets`` raises a
bare "Couldn't reach ..." (after retries); :class:`HubDataUnavailable` says instead what to pass.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, TypeVar, Union

from huggingface_hub import try_to_load_from_cache

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub", "aiohttp", "fsspec")


class HubDataUnavailable(RuntimeError):
    """A hub dataset could not be reached (offline, no network, gated or missing); the message names the fix."""


def hub_offline(*, datasets: bool = False) -> bool:
    """Whether the user has switched the hub off: ``HF_HUB_OFFLINE``, and for datasets ``HF_DATASETS_OFFLINE`` too
    (read here, because ``datasets`` reads it only when imported)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in names)


def hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether the hub answers within ``timeout_s`` (any HTTP answer counts; a refused or hanging connection not)."""
    if hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(f"{endpoint}/api/whoami-v2", timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # 401 without a token: the hub is there
    except (urllib.error.URLError, OSError, ValueError):
        return False


def is_cached(model_id: str) -> bool:
    """Whether ``model_id``'s config is in the local hub cache (then it loads without network)."""
    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # an invalid repo id
        return False
    return isinstance(found, str)


def is_local_folder(source: Union[str, Path], kind: str) -> bool:
    """True for an existing folder, False for a hub id (``owner/name``); anything else is a mistyped folder, and
    raises rather than being sent to the hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return True
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.suffix:
        return False
    raise FileNotFoundError(f"{kind} folder {source} does not exist (nor is it a hub id like owner/name)")


def import_datasets() -> Any:
    """The ``datasets`` module, or an ImportError saying how to install it."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "loading a hub dataset needs the `datasets` package: pip install 'flora-hf[train]' (or pip install "
            "datasets), or pass a local folder instead"
        ) from err
    return datasets


def _is_network_error(err: BaseException) -> bool:
    if isinstance(err, (OSError, TimeoutError)):  # ConnectionError, DatasetNotFoundError (a FileNotFoundError)
        return True
    return any(type(e).__module__.split(".")[0] in _NETWORK_MODULES for e in (err, err.__cause__) if e is not None)


def unavailable(dataset_id: str, what: str, local_hint: str, err: BaseException | None = None) -> HubDataUnavailable:
    """The error for an unreachable hub dataset: what failed, why it probably did, and the local alternative."""
    reason = (
        "the hub is switched off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)"
        if hub_offline(datasets=True)
        else None
    )
    if reason is None:
        reason = f"{type(err).__name__}: {err}" if err is not None else "no network"
    return HubDataUnavailable(
        f"cannot load {what} from the Hugging Face hub dataset {dataset_id!r}: {reason}.\n"
        f"This needs network access, and for gated datasets (The Stack, Common Voice) accepting the terms on the "
        f"dataset's page and logging in (`hf auth login` or HF_TOKEN).\n"
        f"Offline, pass a local folder instead of the hub id: {local_hint}"
    )


def load_hub_dataset(dataset_id: str, what: str, local_hint: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset(dataset_id, **kwargs)``; network failures become :class:`HubDataUnavailable`."""
    datasets = import_datasets()
    try:
        return datasets.load_dataset(dataset_id, **kwargs)
    except Exception as err:
        if _is_network_error(err) or hub_offline(datasets=True):
            raise unavailable(dataset_id, what, local_hint, err) from err
        raise


def guarded_iter(rows: Iterator[T], dataset_id: str, what: str, local_hint: str) -> Iterator[T]:
    """Iterate a streaming dataset, turning a connection lost mid-stream into :class:`HubDataUnavailable`."""
    try:
        yield from rows
    except Exception as err:
        if _is_network_error(err):
            raise unavailable(dataset_id, what, local_hint, err) from err
        raise
