"""Where a transformers model call carries its KV cache, across the rename of ``past_key_values`` to ``cache``.

transformers 5.24 renamed the forward argument and the output field ``past_key_values`` (and ``cache_params``) to
``cache``; older releases only know the old names. MiLoRA keeps its per-prompt gates on the cache object, so it must
find that object under whichever name the installed release uses: a cache it cannot see would make every decoding
step look like a new prompt and silently re-route.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping, Optional

from transformers.cache_utils import Cache

CACHE_NAMES = ("cache", "past_key_values", "cache_params")
"""The names a model call's cache has had, newest first."""


def find_cache(kwargs: Mapping[str, Any]) -> Any:
    """The cache passed to a forward: under a known name, else any argument that is a transformers ``Cache``."""
    for name in CACHE_NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    # A future rename must not hide the cache: find it by type.
    return next((value for value in kwargs.values() if isinstance(value, Cache)), None)


def output_cache(output: Any) -> Any:
    """The cache a forward returned (``output.cache`` on 5.24+, ``output.past_key_values`` before), or None."""
    if not isinstance(output, Mapping):
        return None
    # dict.get, not ModelOutput.get: the latter maps the old names to the new with a deprecation warning.
    for name in CACHE_NAMES:
        value = dict.get(output, name)
        if value is not None:
            return value
    return next((value for value in output.values() if isinstance(value, Cache)), None)


def cache_length(cache: Any) -> int:
    """Tokens already in a cache (0 for None); legacy tuple caches too."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


def cache_argument(model: Any) -> str:
    """The keyword the installed transformers' ``model.forward`` takes its cache as."""
    return _cache_argument_of(type(model))


@functools.cache  # one signature read per model class, not one per decoding step
def _cache_argument_of(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return next((name for name in CACHE_NAMES if name in parameters), "past_key_values")


def cache_kwargs(model: Any, cache: Optional[Cache]) -> dict[str, Any]:
    """``{name: cache}`` for a call of ``model``, under the name its forward takes."""
    return {cache_argument(model): cache}
