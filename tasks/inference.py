"""How validate, test and predict run the network: the model's inference copy, at ``inference_precision``.

Training runs the model as it is (BatchNorm, autograd, ``trainer.precision``). The evaluation and prediction steps
swap in, for the duration of one forward, the inference copy of the task's network
(:func:`resnext_backbones.inference_copy`: the fused trunk, the packed FPN and heads, the sparse RoIAlign, natively in
low precision where the device has it). The copy lives outside the module tree: checkpoints, ``state_dict`` and the
optimizer never see it, and it is rebuilt whenever the model's weights have changed (an optimizer step, a loaded
state dict, a move to another device), so each validation sees the current weights.
"""

from __future__ import annotations

import contextlib
from itertools import chain
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
from torch import nn

from resnext_backbones.deployment import inference_copy, native_dtype

INFERENCE_PRECISIONS: Dict[str, torch.dtype] = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


def precision_name(precision: Union[int, str]) -> str:
    """``32`` | ``bf16`` | ``16`` (ints and Lightning's spellings ``32-true``/``bf16-mixed``/``16-mixed`` accepted)."""
    name = str(precision).removesuffix("-true").removesuffix("-mixed")
    if name not in INFERENCE_PRECISIONS:
        raise ValueError(f"model.inference_precision={precision!r} is not supported; choose one of "
                         f"{list(INFERENCE_PRECISIONS)}")
    return name


def state_fingerprint(module: nn.Module) -> tuple:
    """Changes whenever a tensor of ``module`` is written in place (optimizer step, ``load_state_dict``) or replaced
    (``.to(device)``): each tensor's storage address and version counter."""
    return tuple((t.data_ptr(), t._version) for t in chain(module.parameters(), module.buffers()))


class InferenceRunner:
    """Builds, caches and swaps in the inference copy of one task's network. Not an ``nn.Module``: what it holds stays
    out of the task's module tree (state dict, checkpoints, DDP's parameters)."""

    def __init__(self, precision: str, fused: bool) -> None:
        self.precision, self.fused = precision, fused
        self._cached: Optional[Tuple[tuple, nn.Module]] = None
        self._dtypes: Dict[torch.device, torch.dtype] = {}

    def dtype(self, device: torch.device) -> torch.dtype:
        """The inference dtype on ``device``: ``precision``'s where native, else float32 (warned once per device)."""
        if device not in self._dtypes:
            self._dtypes[device] = native_dtype(INFERENCE_PRECISIONS[self.precision], device,
                                                asked=f"model.inference_precision={self.precision}")
        return self._dtypes[device]

    def copy_of(self, network: nn.Module, model: nn.Module) -> nn.Module:
        """The inference copy of ``network`` for the current weights of ``model`` (which holds it): the cached one,
        or a new one if any weight changed. Unfused in float32 that is ``network`` itself."""
        dtype = self.dtype(next(network.parameters()).device)
        if not self.fused and dtype == torch.float32:
            return network
        key = (dtype, state_fingerprint(model))
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # free the old copy before making a new one
            self._cached = (key, inference_copy(network, dtype, fused=self.fused))
        return self._cached[1]

    def release(self) -> None:
        """Drop the copy (training is about to change the weights anyway)."""
        self._cached = None

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module, attribute: str) -> Iterator[None]:
        """Inside the block, ``model``'s child ``attribute`` is its inference copy; the original is back after, also
        on an error."""
        original = model._modules[attribute]
        model._modules[attribute] = self.copy_of(original, model)
        try:
            yield
        finally:
            model._modules[attribute] = original
