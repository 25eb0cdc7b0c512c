"""MoEFsDiC's building blocks: embeddings, conditioned MoE conv block, Dilated_Fusion_Block,
Freq_Global_Module and the resampling convs.

Routing, dispatch and the experts' gathered evaluation come from the MoE core
(`moelab.moe.MoELayer`) and `ResidualConvExperts`; nothing here re-implements them.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.diffusion.activations import GELU
from moelab.diffusion.convs import DepthwiseSeparableConv2d, PointwiseConv2d, norm_groups
from moelab.diffusion.experts import ResidualConvExperts
from moelab.diffusion.lean_backward import spatial_mean, upsample_ds_conv
from moelab.moe import MoELayer, TopKRouter
from moelab.recompute import recomputed


def conv3x3(cin: int, cout: int, use_dsconv: bool, dilation: int = 1, stride: int = 1) -> nn.Module:
    """3x3 conv, depthwise-separable (depthwise 3x3 + pointwise 1x1) or standard."""
    if use_dsconv and stride == 1:
        return DepthwiseSeparableConv2d(cin, cout, 3, dilation=dilation)
    if use_dsconv:  # strided depthwise + pointwise (the same factorisation, downsampling)
        return nn.Sequential(nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin), PointwiseConv2d(cin, cout))
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``t`` ``[B]`` -> ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t followed by a 2-layer MLP."""

    def __init__(self, base: int, dim: int) -> None:
        super().__init__()
        self.base = base
        self.mlp = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        first = self.mlp[0].weight
        return self.mlp(timestep_embedding(t, self.base).to(first.dtype))


class Conditioning:
    """Per-forward conditioning shared by all blocks: time and class embeddings."""

    __slots__ = ("t_emb", "c_emb")

    def __init__(self, t_emb: Tensor, c_emb: Tensor) -> None:
        self.t_emb, self.c_emb = t_emb, c_emb

    @property
    def joint(self) -> Tensor:
        return self.t_emb + self.c_emb


class CondBlock(nn.Module):
    """Adds a projection of ``t_emb + c_emb`` to the input, then runs the block body.

    ``gradient_checkpointing`` recomputes the body in backward (MoE bodies use the core's own flag).

    The block works channels-last (`inject` lays its input out ``[N, H, W, C]``, a no-op once the
    first block has done it; everything downstream keeps the layout): on CPU oneDNN's depthwise
    convs are ~2x faster there and pointwise convs become single GEMMs (`pointwise_conv`).
    """

    def __init__(self, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.cond = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, channels))
        self.gradient_checkpointing = False

    def inject(self, x: Tensor, cond: Conditioning) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return x + self.cond(cond.joint)[:, :, None, None].to(x.dtype)


class MoEConvBlock(CondBlock):
    """Per-sample top-k MoE over residual conv experts; routed on GAP(x) ++ t_emb ++ c_emb."""

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        num_experts: int,
        k: int,
        use_dsconv: bool,
        router_hidden: int = 64,
        gate: str = "topk_softmax",
        jitter: float = 0.0,
        kernel_size: int = 3,
    ) -> None:
        super().__init__(channels, emb_dim)
        router = TopKRouter(channels + 2 * emb_dim, num_experts, k, hidden=router_hidden or None, gate=gate, jitter=jitter)  # type: ignore[arg-type]
        self.moe = MoELayer(router, ResidualConvExperts(num_experts, channels, use_dsconv, kernel_size))

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        h = self.inject(x, cond)
        feats = torch.cat([spatial_mean(h), cond.t_emb.float(), cond.c_emb.float()], dim=1)  # GAP(h), float32
        self.moe.gradient_checkpointing = self.gradient_checkpointing
        return self.moe(h, router_features=feats.to(h.dtype))


class DilatedFusionBlock(CondBlock):
    """Dilated_Fusion_Block (the MoE-off replacement): parallel 3x3 convs with dilation 1, 2, 4,
    each conv -> GroupNorm -> GELU, concatenated, fused by a 1x1 conv, added to the input."""

    DILATIONS = (1, 2, 4)

    def __init__(self, channels: int, emb_dim: int, use_dsconv: bool) -> None:
        super().__init__(channels, emb_dim)
        g = norm_groups(channels)
        self.branches = nn.ModuleList(
            nn.Sequential(conv3x3(channels, channels, use_dsconv, dilation=d), nn.GroupNorm(g, channels), GELU())
            for d in self.DILATIONS
        )
        self.fuse = PointwiseConv2d(len(self.DILATIONS) * channels, channels)

    def body(self, h: Tensor) -> Tensor:
        return h + self.fuse(torch.cat([b(h) for b in self.branches], dim=1))

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        h = self.inject(x, cond)
        return recomputed(self.body, h, enabled=self.gradient_checkpointing)


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device_type``; nothing where autocast does not exist (the meta
    device, on which the host-synchronisation test runs the model)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def radial_bands(height: int, width: int, bands: int) -> Tensor:
    """Band index (0..bands-1) of every rfft2 frequency bin by its normalised radial frequency."""
    fy = torch.fft.fftfreq(height).abs()[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    r = torch.sqrt(fy**2 + fx**2) / math.sqrt(0.5)  # in [0, 1]
    return (r * bands).long().clamp_(max=bands - 1)


class FreqGlobalModule(CondBlock):
    """Freq_Global_Module: w = MLP(GAP(x) ++ t_emb); X = FFT2(x); X * w; real IFFT2; residual add.

    ``w`` holds one real gain per channel and radial frequency band (``bands``), so the module is a
    global, input- and time-dependent filter over the whole feature map. The FFT runs in float32
    (cuFFT/pocketfft do not support bf16). The last MLP layer starts at zero: an identity
    filter (w = 1) at initialisation.
    """

    def __init__(self, channels: int, emb_dim: int, bands: int = 8) -> None:
        super().__init__(channels, emb_dim)
        self.channels, self.bands = channels, bands
        hidden = max(channels, 32)
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.mlp = nn.Sequential(nn.Linear(channels + emb_dim, hidden), nn.GELU(), nn.Linear(hidden, channels * bands))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self._band_cache: dict[tuple[int, int, str], Tensor] = {}

    def body(self, h: Tensor, t_emb: Tensor) -> Tensor:
        b, c, height, width = h.shape
        feats = torch.cat([h.float().mean(dim=(2, 3)), t_emb.float()], dim=1).to(h.dtype)
        w = 1.0 + self.mlp(feats).float().view(b, c, self.bands)
        band = self._bands_on(height, width, h.device)  # [H, W//2+1]
        gain = w[:, :, band]  # [B, C, H, W//2+1]
        hn = self.norm(h).float()
        with no_autocast(h.device.type):
            spec = torch.fft.rfft2(hn, norm="ortho")
            y = torch.fft.irfft2(spec * gain, s=(height, width), norm="ortho")
        return h + y.to(h.dtype)

    def _bands_on(self, height: int, width: int, device: torch.device) -> Tensor:
        """`radial_bands` for this size, built once per (size, device): no host-to-device copy per forward."""
        key = (height, width, str(device))
        band = self._band_cache.get(key)
        if band is None:
            band = self._band_cache[key] = radial_bands(height, width, self.bands).to(device)
        return band

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        h = self.inject(x, cond)
        return recomputed(self.body, h, cond.t_emb, enabled=self.gradient_checkpointing)


class Resample(nn.Module):
    """A 3x3 conv between resolutions; ``gradient_checkpointing`` recomputes it in backward.

    Recomputing keeps only the (smaller) low-resolution side for backward: for `Upsample`, its
    input instead of the 4x larger upsampled map and the depthwise output the pointwise GEMM saves.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def body(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return recomputed(self.body, x, enabled=self.gradient_checkpointing)


class Downsample(Resample):
    """Stride-2 3x3 conv (depthwise-separable when enabled)."""

    def __init__(self, cin: int, cout: int, use_dsconv: bool) -> None:
        super().__init__()
        self.conv = conv3x3(cin, cout, use_dsconv, stride=2)

    def body(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(Resample):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, cin: int, cout: int, use_dsconv: bool) -> None:
        super().__init__()
        self.conv = conv3x3(cin, cout, use_dsconv)
        #: keep ``x`` rather than the upsampled map and the depthwise output for backward
        #: (`upsample_ds_conv`); same values
        self.lean_backward = True

    def body(self, x: Tensor) -> Tensor:
        if self.lean_backward and isinstance(self.conv, DepthwiseSeparableConv2d):
            return upsample_ds_conv(x, self.conv.depthwise, self.conv.pointwise)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
