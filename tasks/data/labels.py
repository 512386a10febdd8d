"""The one translation between a dataset's category ids and a model's class indices."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class LabelMap:
    """Dataset category ids <-> contiguous labels <-> a model's classes, built once from the data's categories.

    Label ``i`` (what the data modules put in their targets, ``0..N-1``) is the category with the ``i``-th smallest
    id, whatever the order the categories came in. A model whose class 0 is the background (Faster R-CNN) sees
    label ``i`` as class ``i + offset``. Every conversion checks its range and raises: an off-by-one in a mapping
    is an error here, never a silently clamped label.

    Args:
        category_ids: dataset id of each label, ascending.
        names: name of each label.
        offset: the model's class of label 0 (1 behind a background class, else 0).
    """

    category_ids: Tuple[int, ...]
    names: Tuple[str, ...]
    offset: int = 0

    def __post_init__(self) -> None:
        ids = tuple(int(i) for i in self.category_ids)
        if not ids:
            raise ValueError("a label map needs at least one category")
        if list(ids) != sorted(set(ids)):
            raise ValueError(f"category ids {list(ids)} must be unique and ascending; use LabelMap.from_categories")
        if len(self.names) != len(ids):
            raise ValueError(f"{len(ids)} category ids but {len(self.names)} names")
        object.__setattr__(self, "category_ids", ids)
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))

    @classmethod
    def from_categories(cls, categories: Optional[Mapping[int, str]] = None, num_classes: Optional[int] = None,
                        offset: int = 0) -> LabelMap:
        """From ``{category id: name}`` in any order; without categories, ``num_classes`` labels that are their own
        ids (``0..N-1``)."""
        if categories is None:
            if not isinstance(num_classes, int) or num_classes < 1:
                raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
            return cls(tuple(range(num_classes)), tuple(str(i) for i in range(num_classes)), offset)
        items = sorted((int(k), str(v)) for k, v in categories.items())
        if num_classes is not None and len(items) != num_classes:
            raise ValueError(f"{len(items)} categories but num_classes={num_classes}")
        return cls(tuple(k for k, _ in items), tuple(v for _, v in items), offset)

    @classmethod
    def from_coco(cls, categories: Sequence[Mapping]) -> LabelMap:
        """From the ``categories`` list of a COCO file."""
        ids = [int(c["id"]) for c in categories]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate category ids {sorted({i for i in ids if ids.count(i) > 1})}")
        return cls.from_categories({int(c["id"]): c["name"] for c in categories})

    def with_offset(self, offset: int) -> LabelMap:
        """This map for a model whose label 0 is class ``offset``."""
        return replace(self, offset=offset)

    def __len__(self) -> int:
        return len(self.category_ids)

    @property
    def categories(self) -> Dict[int, str]:
        """``{category id: name}``, ascending ids."""
        return dict(zip(self.category_ids, self.names, strict=True))

    def to_dict(self) -> dict:
        """Plain values, for a checkpoint (loads with ``weights_only=True``)."""
        return {"category_ids": list(self.category_ids), "names": list(self.names), "offset": self.offset}

    @classmethod
    def from_dict(cls, state: Mapping) -> LabelMap:
        return cls(tuple(state["category_ids"]), tuple(state["names"]), int(state.get("offset", 0)))

    # -- data: dataset ids -> contiguous labels
    def labels(self, category_ids: Union[Sequence[int], np.ndarray]) -> np.ndarray:
        """Contiguous labels of dataset category ids; an id not in the map raises."""
        ids = np.asarray(category_ids, dtype=np.int64).reshape(-1)
        table = np.asarray(self.category_ids, dtype=np.int64)
        labels = np.searchsorted(table, ids)
        known = (labels < len(table)) & (table[np.minimum(labels, len(table) - 1)] == ids)
        if not known.all():
            raise ValueError(f"category ids {sorted(set(ids[~known].tolist()))[:5]} are not in the label map "
                             f"{list(self.category_ids)}")
        return labels

    # -- model: contiguous labels <-> classes (the background offset)
    def to_model(self, labels: Tensor) -> Tensor:
        """The model's classes of contiguous labels (training targets)."""
        self._check(labels, 0, "label")
        return labels + self.offset

    def category_ids_of(self, labels: Tensor) -> Tensor:
        """Dataset category ids of contiguous labels (metric targets)."""
        self._check(labels, 0, "label")
        return torch.tensor(self.category_ids, dtype=torch.int64, device=labels.device)[labels]

    def category_ids_of_model(self, classes: Tensor) -> Tensor:
        """Dataset category ids of the model's classes (detections, predictions, metrics)."""
        self._check(classes, self.offset, "model class")
        return self.category_ids_of(classes - self.offset)

    def _check(self, values: Tensor, first: int, what: str) -> None:
        if values.numel() and (values.min() < first or values.max() >= first + len(self)):
            bad = values[(values < first) | (values >= first + len(self))]
            raise ValueError(f"{what} {int(bad[0])} is out of range {first}..{first + len(self) - 1} of the label map "
                             f"over category ids {list(self.category_ids)} (offset {self.offset})")
