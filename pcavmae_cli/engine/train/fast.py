"""Speed switches of the training step: ``torch.compile`` with an eager fallback, and activation
checkpointing of the Transformer blocks.

- ``train.compile``: the module the step runs is wrapped in ``torch.compile`` (inductor). A
  machine may be unable to compile (no C++ compiler for the CPU backend, an unsupported GPU, an
  operator dynamo cannot trace); the run must not die for a speed-up, so the first failure prints
  one warning line and the step runs eager from then on. The failed call is repeated eagerly, so a
  genuine error in the model is still raised, by the eager run.
- ``train.activation_checkpointing``: each ``Block`` recomputes its activations in the backward
  pass instead of storing them (``torch.utils.checkpoint``, non-reentrant): about one extra
  forward of the blocks in exchange for memory that no longer grows with depth, for batches that
  would not fit otherwise. Same loss and gradients (the blocks draw no random numbers).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pcavmae_cli.engine.model.blocks import Block


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Switch checkpointing on every ``Block`` of ``model``; returns how many blocks it applies to."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.checkpointed = enabled
    return len(blocks)


def static_compile(module: nn.Module) -> Callable:
    """``torch.compile`` with static shapes: a step's shapes are fixed by the recipe (the last,
    smaller batch of an epoch compiles once more), and inductor's dynamic-shape backward failed
    at run time on the ViT-B step (torch 2.11, H200: a ``view`` of the wrong size)."""
    return torch.compile(module, dynamic=False)


class FallbackCompiled:
    """``module`` run through ``torch.compile``; on the first compile failure, eager for good.

    Args:
        module: the model (or its DDP wrapper) whose ``__call__`` the step uses.
        compile_fn: default ``static_compile`` (tests pass a failing one to simulate a machine
            without a compiler).
    """

    def __init__(self, module: nn.Module, compile_fn: Callable[[nn.Module], Callable] | None = None):
        self.module = module
        self.compiled: Callable | None = None
        try:
            self.compiled = (compile_fn or static_compile)(module)
        except Exception as exc:  # noqa: BLE001 - any failure means: run eager
            self._fall_back(exc)

    def _fall_back(self, exc: BaseException) -> None:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        warnings.warn(
            f"train.compile: torch.compile failed ({type(exc).__name__}: {first}); running eager",
            RuntimeWarning, stacklevel=3,
        )  # fmt: skip
        self.compiled = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - compile errors surface at the first call
                self._fall_back(exc)
        return self.module(*args, **kwargs)


class StepCompiler:
    """What the training loop calls: the module itself, or its ``FallbackCompiled`` (one per
    module, so a DDP wrapper rebuilt for a new stage gets compiled once)."""

    def __init__(self, enabled: bool, compile_fn: Callable[[nn.Module], Callable] | None = None):
        self.enabled, self.compile_fn = enabled, compile_fn
        self._wrapped: dict[int, tuple[nn.Module, FallbackCompiled]] = {}

    def __call__(self, module: nn.Module) -> nn.Module | FallbackCompiled:
        if not self.enabled:
            return module
        held = self._wrapped.get(id(module))
        if held is None or held[0] is not module:
            held = (module, FallbackCompiled(module, self.compile_fn))
            self._wrapped = {id(module): held}  # the previous stage's wrapper is not needed again
        return held[1]
