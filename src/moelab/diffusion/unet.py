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

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from torch import Tensor, nn

from moelab.diffusion.activations import gelu
from moelab.diffusion.blocks import (
    CondBlock,
    Conditioning,
    DilatedFusionBlock,
    Downsample,
    FreqGlobalModule,
    MoEConvBlock,
    Resample,
    TimeEmbedding,
    Upsample,
)
from moelab.diffusion.config import ModelConfig, model_config
from moelab.diffusion.convs import PointwiseConv2d, norm_groups
from moelab.diffusion.experts import ResidualConvExperts
from moelab.diffusion.lean_backward import norm_act_conv
from moelab.moe import MoELayer, moe_layers

_D = ModelConfig()  # the defaults of every architecture field, stated once (in ModelConfig)


def batch_conditions(x: Tensor, t: Tensor | int | float, c: Tensor | None, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-sample timesteps and class ids: a scalar ``t`` is broadcast, ``c=None`` is the null class."""
    t = torch.as_tensor(t, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if c is None:
        c = torch.full((x.shape[0],), num_classes, dtype=torch.long, device=x.device)
    return t, c.long()


class MoEFsDiC_UNet(ModelMixin, ConfigMixin):  # noqa: N801 - the name the quick-start uses
    """``noise_pred, moe_logits = model(x, t, c)``.

    ``x`` ``[B, C, H, W]``; ``t`` ``[B]`` timesteps; ``c`` ``[B]`` class ids, where
    ``c == num_classes`` (or ``c=None``) is the unconditional "null" class used for
    classifier-free guidance. ``moe_logits``: one ``[B, num_experts]`` tensor per MoE block, in
    forward order (empty when MoE is off).

    A diffusers model: the architecture is its config (``model.config``, flat, the fields of
    `ModelConfig`), so ``save_pretrained(dir)`` writes ``config.json`` + safetensors weights and
    ``MoEFsDiC_UNet.from_pretrained(dir)`` rebuilds it. ``model.model_config`` is the typed form.

    Args:
        config (`ModelConfig` or mapping, *optional*): the architecture, whole: a `ModelConfig`, a
            loaded run config, or a raw config dict in the YAML layout (the quick-start's
            ``MoEFsDiC_UNet(yaml.safe_load(...))``), validated here once. When given, the keyword
            fields below are ignored.
        **fields: the `ModelConfig` fields, flat (``in_channels``, ``model_channels``,
            ``channel_mults``, ``image_size``, ``num_classes``, ``emb_dim``, ``layers_per_block``,
            ``freq_bands``, ``moe_enabled``, ``num_experts``, ``top_k``, ``gate``,
            ``router_hidden``, ``jitter``, ``kernel_size``, ``freq_enabled``, ``use_dsconv``), with
            `ModelConfig`'s defaults and meaning; this is how ``from_pretrained`` calls it.
    """

    def __init__(
        self,
        config: ModelConfig | Mapping[str, Any] | None = None,
        *,
        arch: str = "moefsdic",
        in_channels: int = _D.in_channels,
        model_channels: int = _D.model_channels,
        channel_mults: tuple[int, ...] | list[int] = _D.channel_mults,
        image_size: int = _D.image_size,
        num_classes: int = _D.num_classes,
        emb_dim: int | None = _D.emb_dim,
        layers_per_block: int = _D.layers_per_block,
        freq_bands: int = _D.freq_bands,
        moe_enabled: bool = _D.moe_enabled,
        num_experts: int = _D.num_experts,
        top_k: int = _D.top_k,
        gate: str = _D.gate,
        router_hidden: int = _D.router_hidden,
        jitter: float = _D.jitter,
        kernel_size: int = _D.kernel_size,
        freq_enabled: bool = _D.freq_enabled,
        use_dsconv: bool = _D.use_dsconv,
    ) -> None:
        super().__init__()
        if config is None:
            config = model_config(
                None, in_channels=in_channels, model_channels=model_channels, channel_mults=channel_mults,
                image_size=image_size, num_classes=num_classes, emb_dim=emb_dim, layers_per_block=layers_per_block,
                freq_bands=freq_bands, moe_enabled=moe_enabled, num_experts=num_experts, top_k=top_k, gate=gate,
                router_hidden=router_hidden, jitter=jitter, kernel_size=kernel_size, freq_enabled=freq_enabled,
                use_dsconv=use_dsconv,
            )
        mc = model_config(config)
        if mc.arch != "moefsdic":  # the same fields describe the baseline; this class is MoEFsDiC
            mc = mc.replace(arch="moefsdic")
        self.register_to_config(**mc.to_dict())
        self.model_config = mc
        chans = [mc.model_channels * k for k in mc.channel_mults]
        emb = mc.embed_dim
        ds = mc.use_dsconv
        self.num_classes = mc.num_classes
        self.in_channels = mc.in_channels
        self.image_size = mc.image_size
        self.moe_enabled = mc.moe_enabled

        def block(ch: int) -> CondBlock:
            if mc.moe_enabled:
                return MoEConvBlock(
                    channels=ch, emb_dim=emb, num_experts=mc.num_experts, k=mc.top_k, use_dsconv=ds,
                    router_hidden=mc.router_hidden, gate=mc.gate, jitter=mc.jitter, kernel_size=mc.kernel_size,
                )
            return DilatedFusionBlock(channels=ch, emb_dim=emb, use_dsconv=ds)

        self.time_embed = TimeEmbedding(mc.model_channels, emb)
        self.class_embed = nn.Embedding(self.num_classes + 1, emb)  # last row = null class
        # The stem is a standard conv even with use_dsconv: a depthwise conv over 1-3 image
        # channels would hand every feature map a multiple of the same 1-3 filtered images.
        self.stem = nn.Conv2d(mc.in_channels, chans[0], 3, padding=1)

        n, self.layers_per_block = len(chans), mc.layers_per_block
        per_level = [c for c in chans for _ in range(self.layers_per_block)]
        self.enc_blocks = nn.ModuleList(block(c) for c in per_level)
        self.downs = nn.ModuleList(Downsample(chans[i], chans[min(i + 1, n - 1)], ds) for i in range(n))
        cb = chans[-1]
        self.mid_down = Downsample(cb, cb, ds)
        self.mid = FreqGlobalModule(cb, emb, mc.freq_bands) if mc.freq_enabled else block(cb)
        self.mid_up = Upsample(cb, cb, ds)
        self.ups = nn.ModuleList(Upsample(chans[min(i + 1, n - 1)], chans[i], ds) for i in range(n))
        self.merges = nn.ModuleList(PointwiseConv2d(2 * c, c) for c in chans)  # 1x1: one GEMM channels-last
        self.dec_blocks = nn.ModuleList(block(c) for c in per_level)
        self.out_norm = nn.GroupNorm(norm_groups(chans[0]), chans[0])
        self.out_conv = nn.Conv2d(chans[0], mc.in_channels, 3, padding=1)
        #: the output head keeps only its input for backward (`norm_act_conv`; `set_lean_backward`)
        self.lean_backward = True

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor | int | float, c: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        t, c = batch_conditions(x, t, c, self.num_classes)
        cond = Conditioning(self.time_embed(t), self.class_embed(c))

        # channels-last from the stem on (a copy of the 1-3 channel input, not of the first feature map)
        h = self.stem(x.contiguous(memory_format=torch.channels_last))
        skips = []
        for i, down in enumerate(self.downs):
            for blk in self._level(self.enc_blocks, i):
                h = blk(h, cond)
            skips.append(h)
            h = down(h)
        h = h + self.mid_up(self.mid(self.mid_down(h), cond))
        for i in reversed(range(len(self.ups))):
            h = self.ups[i](h)
            h = self.merges[i](h, skips[i])  # = 1x1 conv of cat([h, skip]), without the copy
            for blk in self._level(self.dec_blocks, i):
                h = blk(h, cond)
        if self.lean_backward:  # same values; keeps h for backward, not the norm's and GELU's outputs
            out = norm_act_conv(h, self.out_norm, self.out_conv)
        else:
            out = self.out_conv(gelu(self.out_norm(h)))
        out = out.contiguous()  # blocks run channels-last; callers get NCHW
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
    def set_gradient_checkpointing(self, enabled: bool = True, levels: Sequence[int] | None = None) -> None:
        """Recompute in backward: block bodies (MoE experts one expert call at a time via the core's
        flag, fusion/freq bodies) and the up/down-sampling convs.

        Args:
            enabled: turn recomputation on (True) or off (False) for the chosen modules.
            levels: only these resolution levels (indices into ``channel_mults``, 0 = full
                resolution): their encoder and decoder blocks, the downsampling conv that leaves
                the level and the upsampling conv that enters it. None: the whole network,
                bottleneck included. The modules outside ``levels`` are left as they are.
        """
        chosen: list[nn.Module] = [self]
        if levels is not None:
            bad = [i for i in levels if not 0 <= i < len(self.downs)]
            if bad:
                raise ValueError(f"levels {bad} do not exist: this network has levels 0..{len(self.downs) - 1}")
            chosen = []
            for i in levels:
                chosen += [*self._level(self.enc_blocks, i), *self._level(self.dec_blocks, i), self.downs[i], self.ups[i]]
        for top in chosen:
            for mod in top.modules():
                if isinstance(mod, (CondBlock, Resample)):
                    mod.gradient_checkpointing = enabled

    def set_lean_backward(self, enabled: bool = True) -> None:
        """Whether the MoE experts, the upsampling convs and the output head keep only what is
        costly to recompute for backward (`moelab.diffusion.lean_backward`, the default) or run as
        plain autograd ops. Same values and gradients either way."""
        self.lean_backward = enabled
        for mod in self.modules():
            if isinstance(mod, (ResidualConvExperts, Upsample)):
                mod.lean_backward = enabled

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and parameters active per sample (k of E experts in every MoE block)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for layer in moe_layers(self):
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            inactive += expert_params * (layer.num_experts - layer.k) // layer.num_experts
        return {"total": total, "active_per_sample": total - inactive, "moe_blocks": len(moe_layers(self))}

