"""Activation recomputation (gradient checkpointing), decided in one place.

Every module that can trade compute for memory (MoE dispatch, the U-Net's block bodies and
resampling convs) calls `recomputed`, so the rule is the same everywhere: torch's non-reentrant
checkpoint when asked for and autograd is recording, a plain call otherwise (no-grad sampling and
evaluation never pay for it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def recomputed(fn: Callable[..., Tensor], *args: Any, enabled: bool) -> Tensor:
    """``fn(*args)``; with ``enabled`` (and grad mode on) its activations are not kept for
    backward but recomputed there. Same values, same gradients."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
