"""MoEFsDiC_UNet: class-conditional diffusion U-Net with per-sample MoE conv blocks.

Layout (L = len(channel_mults), ch_i = model_channels * channel_mults[i]):
  stem conv3x3 -> encoder level i: block(ch_i) x n [skip_i] + downsample (ch_i -> ch_{i+1})
  -> bottleneck: downsample + Freq_Global_Module (or a MoE / fusion block when freq is off)
     + upsample, added to its input
  -> decoder level i (deepest first): upsample + concat skip_i + 1x1 merge + block(ch_i) x n
  -> GroupNorm + GELU + conv3x3.
Blocks are MoE blocks (moe.enabled) or Dilated_Fusion_Blocks; all are conditioned on t and c.
n = model.layers_per_block (1: the original layout); level i's blocks are entries i*n .. i*n+n-1
of ``enc_blocks`` / ``dec_blocks``, so n = 1 keeps the original parameter names.
The image is halved L + 1 times, so image_size must be divisible by 2^(L+1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.diffusion.blocks import (
    CondBlock,
    Conditioning,
    DilatedFusionBlock,
    Downsample,
    FreqGlobalModule,
    MoEConvBlock,
    TimeEmbedding,
    Upsample,
)
from moelab.diffusion.experts import norm_groups
from moelab.moe import MoELayer, moe_layers


def batch_conditions(x: Tensor, t: Tensor | int | float, c: Tensor | None, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-sample timesteps and class ids: a scalar ``t`` is broadcast, ``c=None`` is the null class."""
    t = torch.as_tensor(t, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if c is None:
        c = torch.full((x.shape[0],), num_classes, dtype=torch.long, device=x.device)
    return t, c.long()


class MoEFsDiC_UNet(nn.Module):  # noqa: N801 - the name the quick-start uses
    """``noise_pred, moe_logits = model(x, t, c)``.

    ``x`` ``[B, C, H, W]``; ``t`` ``[B]`` timesteps; ``c`` ``[B]`` class ids, where
    ``c == num_classes`` (or ``c=None``) is the unconditional "null" class used for
    classifier-free guidance. ``moe_logits``: one ``[B, num_experts]`` tensor per MoE block, in
    forward order (empty when MoE is off).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        from moelab.diffusion.config import load_config

        cfg = load_config(config)
        self.config = cfg
        m, moe = cfg["model"], cfg["moe"]
        ds = cfg["train"]["use_dsconv_global"]
        mc = m["model_channels"]
        chans = [mc * k for k in m["channel_mults"]]
        emb = m["emb_dim"] or 4 * mc
        self.num_classes = m["num_classes"]
        self.in_channels = m["in_channels"]
        self.image_size = m["image_size"]
        self.moe_enabled = moe["enabled"]

        def block(ch: int) -> CondBlock:
            if moe["enabled"]:
                return MoEConvBlock(
                    ch, emb, moe["num_experts"], moe["k_active"], ds, moe["router_hidden"], moe["gate"], moe["jitter"], moe["kernel_size"]
                )
            return DilatedFusionBlock(ch, emb, ds)

        self.time_embed = TimeEmbedding(mc, emb)
        self.class_embed = nn.Embedding(self.num_classes + 1, emb)  # last row = null class
        # The stem is a standard conv even with use_dsconv_global: a depthwise conv over 1-3 image
        # channels would hand every feature map a multiple of the same 1-3 filtered images.
        self.stem = nn.Conv2d(m["in_channels"], chans[0], 3, padding=1)

        n, self.layers_per_block = len(chans), m["layers_per_block"]
        per_level = [c for c in chans for _ in range(self.layers_per_block)]
        self.enc_blocks = nn.ModuleList(block(c) for c in per_level)
        self.downs = nn.ModuleList(Downsample(chans[i], chans[min(i + 1, n - 1)], ds) for i in range(n))
        cb = chans[-1]
        self.mid_down = Downsample(cb, cb, ds)
        self.mid = FreqGlobalModule(cb, emb, m["freq_bands"]) if cfg["freq"]["enabled"] else block(cb)
        self.mid_up = Upsample(cb, cb, ds)
        self.ups = nn.ModuleList(Upsample(chans[min(i + 1, n - 1)], chans[i], ds) for i in range(n))
        self.merges = nn.ModuleList(nn.Conv2d(2 * c, c, 1) for c in chans)
        self.dec_blocks = nn.ModuleList(block(c) for c in per_level)
        self.out_norm = nn.GroupNorm(norm_groups(chans[0]), chans[0])
        self.out_conv = nn.Conv2d(chans[0], m["in_channels"], 3, padding=1)

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor | int | float, c: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        t, c = batch_conditions(x, t, c, self.num_classes)
        cond = Conditioning(self.time_embed(t), self.class_embed(c))

        h = self.stem(x)
        skips = []
        for i, down in enumerate(self.downs):
            for blk in self._level(self.enc_blocks, i):
                h = blk(h, cond)
            skips.append(h)
            h = down(h)
        h = h + self.mid_up(self.mid(self.mid_down(h), cond))
        for i in reversed(range(len(self.ups))):
            h = self.ups[i](h)
            h = self.merges[i](torch.cat([h, skips[i]], dim=1))
            for blk in self._level(self.dec_blocks, i):
                h = blk(h, cond)
        out = self.out_conv(F.gelu(self.out_norm(h)))
        return out, self.moe_logits()

    def moe_logits(self) -> list[Tensor]:
        """Router logits of the last forward, one ``[B, E]`` tensor per MoE block in forward order."""
        return [layer.last_routing.logits for layer in self._moe_in_forward_order() if layer.last_routing is not None]

    def _level(self, blocks: nn.ModuleList, i: int) -> nn.ModuleList:
        """Level ``i``'s blocks of ``enc_blocks`` / ``dec_blocks``, in forward order."""
        n = self.layers_per_block
        return blocks[i * n : (i + 1) * n]  # type: ignore[return-value]

    def _moe_in_forward_order(self) -> list[MoELayer]:
        dec = [b for i in reversed(range(len(self.ups))) for b in self._level(self.dec_blocks, i)]
        blocks: list[nn.Module] = [*self.enc_blocks, self.mid, *dec]
        return [m for b in blocks for m in moe_layers(b)]

    # --- utilities -----------------------------------------------------------------------------
    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block bodies (MoE experts via the core's flag, fusion/freq bodies) in backward."""
        for mod in self.modules():
            if isinstance(mod, CondBlock):
                mod.gradient_checkpointing = enabled

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and parameters active per sample (k of E experts in every MoE block)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for layer in moe_layers(self):
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            inactive += expert_params * (layer.num_experts - layer.k) // layer.num_experts
        return {"total": total, "active_per_sample": total - inactive, "moe_blocks": len(moe_layers(self))}


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """The model a config asks for: MoEFsDiC (default) or the dense diffusers UNet2D baseline."""
    from moelab.diffusion.config import load_config

    cfg = load_config(config)
    if cfg["model"]["arch"] == "unet2d":
        from moelab.diffusion.baseline import DenseUNet2D

        return DenseUNet2D(cfg)
    return MoEFsDiC_UNet(cfg)
