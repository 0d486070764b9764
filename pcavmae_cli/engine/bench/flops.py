"""FLOP counting that sees attention on every device.

``torch.utils.flop_counter`` knows the GPU kernels of ``scaled_dot_product_attention`` (flash,
memory-efficient, cuDNN) but not the CPU one (``_scaled_dot_product_flash_attention_for_cpu``
and its backward), so on a CPU it silently counts attention as zero: for the paper's base model
that is about 10 % of the step's FLOPs (``pretrain_audioset``: 200.5 GFLOP/sample without the
attention products, 221 with them), and MFU would come out too low by as much. ``flop_counter``
registers the same formulas torch uses for the GPU kernels for the CPU kernels, once per
process, and counts a step with them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils import flop_counter as fc

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_SDPA_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Forward: ``Q K^T`` and ``softmax(.) V``, as ``flop_counter.sdpa_flop_count``."""
    return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Backward: the four products of the gradients, as ``flop_counter.sdpa_backward_flop_count``."""
    return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def register_cpu_attention() -> None:
    """Teach ``FlopCounterMode`` the CPU attention kernels (idempotent)."""
    for op, formula in ((_CPU_SDPA, _sdpa_cpu_flop), (_CPU_SDPA_BACKWARD, _sdpa_cpu_backward_flop)):
        if op not in fc.flop_registry and op.default not in fc.flop_registry:
            fc.register_flop_formula(op)(formula)


def count(fn: Callable[[], None]) -> int:
    """FLOPs of matrix products, convolutions and attention that ``fn()`` runs (on any device)."""
    register_cpu_attention()
    with fc.FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
