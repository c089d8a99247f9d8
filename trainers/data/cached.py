"""A dataset wrapper that computes each item once, shared by the recipes and the tiny Whisper's pretraining."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class CachedItems(Dataset):
    """Every item computed once and kept: for the tiny recipes, whose few clips are read many epochs over and
    whose log-mel features would otherwise be recomputed at every step. ``stats`` is the wrapped dataset's."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.stats = getattr(dataset, "stats", None)
        self._items: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        if index not in self._items:
            self._items[index] = self.dataset[index]
        return self._items[index]
