"""MoEFsDiC's training loss: noise MSE plus the MoE core's load-balance loss.

``loss, dm_loss, load_loss = MoELoss(lambda_load=0.01)(noise_pred, noise, moe_logits)``.
``load_loss`` is `moelab.moe.aux_loss` averaged over the MoE blocks: ``kind="switch"`` (default,
Switch/GShard ``E * sum_i f_i P_i``) or ``kind="variance"`` (the quick-start's per-sample variance
of the routing probabilities). The logits a MoEFsDiC model returns carry the routing each block
actually made, so ``f_i`` is counted over each block's own selected experts, exact for any k
without being told it. With no MoE block (moe_logits empty) it is 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from moelab.moe import LOSS_KINDS, aux_loss


class MoELoss(nn.Module):
    """Diffusion MSE + ``lambda_load`` x load-balance loss (+ optional router z-loss).

    Args:
        lambda_load (`float`, defaults to 0.01): weight of the load-balance loss.
        kind (`str`, defaults to `"switch"`): `"switch"` (Switch/GShard) or `"variance"` (quick-start).
        k_active (`int`, *optional*): experts per sample, used only for logits that carry no
            recorded routing (logits not returned by a moelab router); a model's ``moe_logits``
            always use the routing their blocks made.
        z_coef (`float`, defaults to 0.0): weight of the router z-loss.
    """

    def __init__(self, lambda_load: float = 0.01, kind: str = "switch", k_active: int | None = None, z_coef: float = 0.0) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown load-loss kind {kind!r}; use one of {LOSS_KINDS}")
        self.lambda_load, self.kind, self.z_coef = float(lambda_load), kind, float(z_coef)
        self.k_active = None if k_active is None else int(k_active)

    def forward(self, noise_pred: Tensor, noise: Tensor, moe_logits: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        dm_loss = F.mse_loss(noise_pred.float(), noise.float())
        if len(moe_logits) == 0:
            load_loss = dm_loss.new_zeros(())
        else:
            k = None if self.k_active is None else min(self.k_active, moe_logits[0].shape[-1])
            load_loss = aux_loss(list(moe_logits), k, self.kind, self.z_coef)  # type: ignore[arg-type]
        return dm_loss + self.lambda_load * load_loss, dm_loss, load_loss

    @classmethod
    def from_config(cls, config: dict) -> "MoELoss":
        moe = config["moe"]
        return cls(config["train"]["lambda_load"], moe["load_loss"], moe["k_active"], moe["z_loss_coef"])
