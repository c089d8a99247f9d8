"""Adapter store: every registered adapter in a host-memory pool, the recently used ones in device slots (LRU).

The scheduler asks for an adapter's slot with :meth:`AdapterStore.acquire`. A resident adapter is pinned for as long
as a batch row uses it; a cold one is copied into a free (or least recently used, unpinned) slot by a background
thread while the running batch keeps decoding, and its request waits in the queue until then.

A MiLoRA adapter's experts go into the LoRA banks of their modules (each module learns its gate column in its
transformer layer) and its routers into the :class:`~serving.routers.SlotRouter` of each layer, same slot index.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

from torch import nn

from ..routers import SlotRouter, attach_router, expert_columns
from ..slot_layers import SlotLinear, wrap_module
from ..step_metadata import AdapterContext
from ..types import AdapterError
from .loader import AdapterWeights, load_adapter_folder, split_layer_path

logger = logging.getLogger(__name__)


ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")
"""A plain identifier, or a hub-style ``owner/name`` (what TGI's ``adapter_id`` usually is); no path tricks."""


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not ADAPTER_NAME.match(name) or ".." in name:
        raise AdapterError(
            f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' (at most 128), optionally as "
            "owner/name"
        )


def resolve_folder(path: str | Path) -> Path:
    """The absolute folder ``path`` names; any path the OS cannot resolve (NUL bytes, unknown ~user) is an
    AdapterError, so the client gets a 422, not a 500."""
    try:
        return Path(path).expanduser().resolve()
    except (ValueError, RuntimeError, OSError, TypeError) as err:
        raise AdapterError(f"invalid adapter path {str(path)!r}: {err}") from None


class AdapterStore:
    def __init__(
        self,
        model: nn.Module,
        context: AdapterContext,
        *,
        num_slots: int,
        max_rank: int,
        roots: Iterable[str | Path] = (),
    ) -> None:
        if num_slots < 1:
            raise ValueError("the server needs at least one adapter slot")
        self.model = model
        self.context = context
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.roots = [Path(r).resolve() for r in roots]
        self._host: dict[str, AdapterWeights] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free = list(range(num_slots, 0, -1))  # slot 0 is "no adapter"
        self._pins: dict[str, int] = {}
        # slots of adapters unloaded (or replaced) while rows still decode with them: slot -> rows left. They are
        # out of ``_resident``, so a name loaded again always gets its new weights in a slot of its own.
        self._retired: dict[int, int] = {}
        self.routers: dict[str, SlotRouter] = {}  # transformer layer path -> its MiLoRA router
        self._registering: set[str] = set()  # names whose folder is being read: a second load of one waits its turn
        self._loading: dict[str, Future] = {}
        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")
        self.loads = 0  # device loads done, for tests and metrics
        self.evictions = 0
        self.load_finished: Optional[threading.Condition] = None
        """Notified (``notify_all``) each time a device load ends, loaded or failed: the engine's scheduler waits on
        it while its queued requests wait for cold adapters (:meth:`acquire` returned None)."""

    # ------------------------------------------------------------------------------------------ registry
    def _check_root(self, folder: Path) -> None:
        if not self.roots:
            raise AdapterError("hot-loading is disabled: no adapter roots are configured")
        if not any(folder == root or root in folder.parents for root in self.roots):
            raise AdapterError(f"{folder} is outside the allowed adapter roots {[str(r) for r in self.roots]}")

    def register(self, name: str, path: str | Path, *, check_root: bool = True) -> AdapterWeights:
        """Read, validate and pool an adapter (host memory); the model keeps serving whatever happens."""
        check_adapter_name(name)
        folder = resolve_folder(path)
        if check_root:
            self._check_root(folder)
        with self._lock:
            if name in self._host or name in self._registering:
                raise AdapterError(f"an adapter named {name!r} is already loaded (or loading); unload it first")
            self._registering.add(name)
        try:
            return self._register(name, folder)
        finally:
            with self._lock:
                self._registering.discard(name)

    def _register(self, name: str, folder: Path) -> AdapterWeights:
        weights = load_adapter_folder(name, folder, self.model, self.max_rank)
        with self._lock:
            if weights.method == "milora":
                self._check_expert_columns(weights)
            for module_path in weights.modules:
                wrap_module(self.model, module_path, self.context, self.num_slots, self.max_rank)
            for layer_path in weights.routers:
                router = attach_router(self.model, layer_path, self.context, self.routers)
                for module_path in weights.modules:
                    layer, expert = split_layer_path(module_path)
                    if layer == layer_path:
                        self.model.get_submodule(module_path).gate_site = (layer_path, router.columns[expert])
            self._host[name] = weights
        logger.info("registered adapter %s (%s, rank %d) from %s", name, weights.method, weights.rank, folder)
        return weights

    def _check_expert_columns(self, weights: AdapterWeights) -> None:
        for layer_path, router in weights.routers.items():
            known = self.routers.get(layer_path)
            columns = known.experts if known is not None else expert_columns(self.model.get_submodule(layer_path))
            unknown = sorted(set(router.experts) - set(columns))
            if unknown:
                raise AdapterError(
                    f"adapter {weights.name!r}: MiLoRA experts {unknown} of {layer_path} are not linear modules of "
                    f"that layer the server can adapt ({list(columns)})"
                )

    def router_counts(self) -> dict[str, int]:
        """Prompts each MiLoRA router has routed: once per prompt, never per decoding step."""
        return {path: router.prompts_routed for path, router in self.routers.items()}

    def unregister(self, name: str) -> None:
        """Forget an adapter; its slot is freed now, or when the last row using it finishes."""
        with self._lock:
            if name not in self._host:
                raise AdapterError(f"unknown adapter {name!r}")
            del self._host[name]
            pins = self._pins.pop(name, 0)
            if not pins:
                self._evict(name)
                return
            slot = self._resident.pop(name, None)
            if slot is not None:  # rows decoding with it finish on its weights; then the slot is cleared
                self._retired[slot] = self._retired.get(slot, 0) + pins

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._host)

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._host

    def get(self, name: str) -> AdapterWeights:
        with self._lock:
            try:
                return self._host[name]
            except KeyError:
                raise AdapterError(f"unknown adapter {name!r}; loaded adapters: {sorted(self._host)}") from None

    def resident(self) -> dict[str, int]:
        with self._lock:
            return dict(self._resident)

    # ---------------------------------------------------------------------------------------- device slots
    def acquire(self, name: str) -> Optional[int]:
        """The adapter's slot, pinned, or None while it is being brought onto the device (ask again later)."""
        with self._lock:
            if name not in self._host:
                raise AdapterError(f"unknown adapter {name!r}; loaded adapters: {sorted(self._host)}")
            slot = self._resident.get(name)
            if slot is not None:
                self._resident.move_to_end(name)
                self._pins[name] = self._pins.get(name, 0) + 1
                return slot
            if name not in self._loading:
                slot = self._take_slot()
                if slot is not None:
                    self._loading[name] = self._executor.submit(self._load, name, slot, self._host[name])
            return None

    def release(self, name: str, slot: Optional[int] = None) -> None:
        """Unpin the adapter a finished row used; ``slot`` (the row's) tells a retired slot from a reloaded name's."""
        with self._lock:
            if slot is not None and slot in self._retired:
                self._retired[slot] -= 1
                if self._retired[slot] <= 0:
                    del self._retired[slot]
                    self._clear_slot(slot)
                return
            left = self._pins.get(name, 0) - 1
            if left > 0:
                self._pins[name] = left
                return
            self._pins.pop(name, None)
            if name not in self._host:  # unloaded while in use
                self._evict(name)

    def warm(self, names: Iterable[str], timeout: float = 60.0) -> None:
        """Bring adapters onto the device now (start-up), so their first requests do not wait for a load."""
        for name in list(names)[: self.num_slots]:
            if self.acquire(name) is None:
                self.wait_loaded(name, timeout)
            else:
                self.release(name)

    def wait_loaded(self, name: str, timeout: float = 30.0) -> None:
        """Block until a pending device load finishes (tests and warm-up)."""
        with self._lock:
            future = self._loading.get(name)
        if future is not None:
            future.result(timeout=timeout)

    def _take_slot(self) -> Optional[int]:
        if self._free:
            return self._free.pop()
        for victim in self._resident:  # least recently used first
            if not self._pins.get(victim):
                slot = self._resident.pop(victim)
                self.evictions += 1
                return slot
        return None  # every slot is in use by running rows: the request waits

    def _evict(self, name: str) -> None:
        slot = self._resident.pop(name, None)
        if slot is not None:
            self._clear_slot(slot)

    def _clear_slot(self, slot: int) -> None:
        for layer in self._slot_layers():
            layer.clear_slot(slot)
        for router in self._routers():
            router.clear_slot(slot)
        self._free.append(slot)

    def _slot_layers(self) -> list[SlotLinear]:
        return [m for m in self.model.modules() if isinstance(m, SlotLinear)]

    def _routers(self) -> list[SlotRouter]:
        return list(self.routers.values())

    def _load(self, name: str, slot: int, weights: AdapterWeights) -> None:
        try:
            paths = {id(self.model.get_submodule(p)): p for p in weights.modules}
            for layer in self._slot_layers():
                layer.write_slot(slot, weights.modules.get(paths.get(id(layer), ""), {}))
            for router in self._routers():
                router.write_slot(slot, weights.routers.get(router.key))
            with self._lock:
                if self._host.get(name) is not weights:  # unloaded (or replaced) while it was being copied
                    self._clear_slot(slot)
                    return
                self._resident[name] = slot
                self.loads += 1
        except Exception:
            logger.exception("loading adapter %s into slot %d failed", name, slot)
            with self._lock:
                self._free.append(slot)
            raise
        finally:
            with self._lock:
                self._loading.pop(name, None)
            self._notify_load_finished()

    def _notify_load_finished(self) -> None:
        """Wake the waiters of :attr:`load_finished`; outside the store's lock, as the engine's scheduler calls into
        the store while it holds that condition."""
        condition = self.load_finished
        if condition is not None:
            with condition:
                condition.notify_all()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
