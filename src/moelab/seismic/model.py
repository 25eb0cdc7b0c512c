"""SeisMoE: SeisBench's EQTransformer whose two transformer feed-forward networks are sparse MoE layers.

Only ``transformer_d0.ff`` and ``transformer_d.ff`` change: each becomes a core `TokenMoE` whose
experts are copies of the dense FeedForward (16 -> 128 -> 16, ReLU, dropout) and whose router is a
Linear(16, E) with bias. Every time position of every trace is one token, routed on its own.
Because SeisMoE *is* an EQTransformer subclass, SeisBench's ``annotate``/``classify`` (continuous
picking), ``save``/``load`` (json + pt folder format) and ``get_model_args`` keep working.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from seisbench.models import EQTransformer
from seisbench.models.eqtransformer import FeedForward
from torch import Tensor, nn

from moelab.checkpoint import load_error_detail, safe_load
from moelab.errors import CheckpointError, ConfigError
from moelab.validation import unknown_key
from moelab.moe import GATES, LOSS_KINDS, TokenMoE, model_aux_loss, moe_usage, reset_moe_stats
from moelab.moe.layer import moe_layers
from moelab.seismic.weights import MOE_ARGS, BaseWeights, apply_metadata, eqtransformer_from, holds_moe, load_base_weights, load_local
from moelab.validation import distinct_names, is_instance

__all__ = ["MOE_ARGS", "MOE_BLOCKS", "SeisMoE", "drop_upcycle", "load_trained", "widen_into", "window_annotate_args"]

#: The EQTransformer blocks whose feed-forward network becomes an MoE layer.
MOE_BLOCKS: tuple[str, ...] = ("transformer_d0", "transformer_d")


class TokenFeedForward(nn.Module):
    """EQTransformer's FeedForward on tokens ``[..., D]`` (the dense one permutes ``[B, D, T]`` itself).

    Same parameter names (``lin1``, ``lin2``) and computation, so a dense FFN copies in exactly.
    """

    def __init__(self, io_size: int = 16, drop_rate: float = 0.1, hidden_size: int = 128) -> None:
        super().__init__()
        self.lin1 = nn.Linear(io_size, hidden_size)
        self.lin2 = nn.Linear(hidden_size, io_size)
        self.dropout = nn.Dropout(drop_rate)

    @classmethod
    def from_dense(cls, dense: FeedForward, hidden_size: int | None = None) -> "TokenFeedForward":
        """A copy of ``dense``; with ``hidden_size`` larger than its own, widened without changing
        what it computes (`widen_into`): the extra hidden units start with ``lin1``'s fresh
        initialisation and zero weight into ``lin2``."""
        hidden = dense.lin1.out_features if hidden_size is None else hidden_size
        ff = cls(dense.lin1.in_features, dense.dropout.p, hidden)
        source = dense.state_dict()
        with torch.no_grad():
            for name, target in ff.state_dict(keep_vars=True).items():
                target.copy_(widen_into(source[name], target.detach(), name))
        return ff

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.dropout(torch.relu(self.lin1(x))))


def fits_into(value: Tensor, target: Tensor) -> bool:
    """Whether `widen_into` can write ``value`` into ``target``: same rank, no dimension larger."""
    return value.dim() == target.dim() and all(v <= t for v, t in zip(value.shape, target.shape, strict=True))


def widen_into(value: Tensor, target: Tensor, name: str) -> Tensor:
    """``value`` (a dense FFN tensor) written into the leading block of ``target`` (a wider FFN's).

    Function-preserving widening (Net2Net-style, with zero fan-out): the FFN's extra hidden units
    keep ``target``'s own values in ``lin1`` (fresh initialisation, so they are not dead) and get
    zero weight into ``lin2`` (the extra *columns* of a 2-d weight whose input side is wider), so
    the wider FFN outputs exactly what the dense one does; training then grows them. Why: the
    dense FFN of EQTransformer is 16 -> 128 -> 16 (4,240 parameters), and copies of it give an MoE
    layer little capacity to add; wider experts can be upcycled from the same pretrained weights.
    Equal shapes: ``value`` itself. A ``value`` larger than ``target`` in any dimension cannot be
    copied in (ValueError naming ``name``).
    """
    if value.shape == target.shape:
        return value
    if not fits_into(value, target):
        raise ValueError(f"'{name}': the dense tensor {tuple(value.shape)} does not fit into {tuple(target.shape)}")
    out = target.clone()
    if value.dim() == 2 and value.shape[1] < target.shape[1]:
        out[:, value.shape[1]:] = 0.0
    out[tuple(slice(0, n) for n in value.shape)] = value
    return out


class ChannelsFirstTokenMoE(TokenMoE):
    """`TokenMoE` taking EQTransformer's ``[B, D, T]`` layout: each of the B*T positions is one token.

    With ``detach_router_input`` the router sees the tokens without gradient: the load-balance
    loss then trains the routers only and cannot reshape the shared features the detection and
    picking heads read (measured at random initialisation, coefficient 0.01: its gradient into the
    trunk was ~8x that of the 0.05-weighted detection term). The task loss still trains the
    routers (through the combine weights) and the trunk (through the experts).

    With ``router_context`` the router sees each token next to the mean of all tokens of its trace
    (``[token, mean over time]``, twice the width): a summary of the whole window -- its noise,
    its sampling rate's imprint on the features, whether an event is in it -- so tokens of
    different kinds of record can go to different experts. A token alone is 16 numbers of one
    position, and the routing of plain SeisMoE on pooled data told almost nothing about where a
    record came from. Routing stays per token; the experts see the token only. (Measured on the
    pooled data, six seeds: the routing stayed as blind to the source, because the trace means
    themselves carry little of it -- docs/seismoe-quality.md.)

    With ``num_sources`` > 0 (Task-MoE's task id) the router also sees which data source the trace
    comes from: a one-hot of ``num_sources`` entries per trace (``source_onehot``, ``[B, S]``, set
    for one forward by `SeisMoE.routed_by_source`; all zero for a trace of unknown source, or when
    none is set), next to every token of the trace.
    """

    detach_router_input: bool = True
    router_context: bool = False
    num_sources: int = 0
    source_onehot: Tensor | None = None

    def forward(self, x: Tensor, router_features: Tensor | None = None) -> Tensor:
        tokens = x.transpose(1, 2)
        if router_features is not None:
            router_features = router_features.transpose(1, 2)
        else:
            router_features = tokens.detach() if self.detach_router_input else tokens
            if self.router_context:
                context = router_features.mean(dim=1, keepdim=True).expand_as(router_features)
                router_features = torch.cat([router_features, context], dim=-1)
            if self.num_sources:
                b, t = tokens.shape[:2]
                onehot = self.source_onehot
                if onehot is None:
                    onehot = tokens.new_zeros(b, self.num_sources)
                elif onehot.shape != (b, self.num_sources):
                    raise ValueError(
                        f"source one-hot of shape {tuple(onehot.shape)} for a batch of {b} traces and {self.num_sources} sources"
                    )
                onehot = onehot.to(router_features.dtype)[:, None, :].expand(b, t, self.num_sources)
                router_features = torch.cat([router_features, onehot], dim=-1)
        return super().forward(tokens, router_features).transpose(1, 2)


def upcycle_feedforward(
    dense: FeedForward,
    num_experts: int,
    k: int,
    gate: str = "topk_softmax",
    jitter: float = 0.0,
    shared_expert: bool = False,
    expert_hidden: int | None = None,
    router_context: bool = False,
    num_sources: int = 0,
) -> ChannelsFirstTokenMoE:
    """MoE layer whose experts are copies of ``dense`` (core `MoELayer.upcycle`): same output at init.

    ``shared_expert``: one more copy of ``dense`` as an always-on shared expert; the layer then
    outputs ``0.5 * shared(x) + 0.5 * routed(x)``, still the dense output at init.
    ``expert_hidden``: hidden size of every expert (routed and shared), >= the dense FFN's; wider
    copies are widened without changing their output (`TokenFeedForward.from_dense`).
    ``router_context``: the router sees ``[token, mean of the trace's tokens]`` (see
    `ChannelsFirstTokenMoE`); its input is then twice the token width.
    ``num_sources``: the router also sees a one-hot of the trace's data source (``num_sources``
    more inputs). Their weights start at unit scale (N(0, 1)), so that each source starts with an
    expert preference of its own: zero would leave the upcycled experts symmetric in the source
    and nothing would push them apart by it (what the pooled runs found for the token features).
    """
    expert = TokenFeedForward.from_dense(dense, expert_hidden)
    width = expert.lin1.in_features * (2 if router_context else 1)
    layer = ChannelsFirstTokenMoE.upcycle(
        expert, num_experts, k, router_in_features=width + num_sources, gate=gate, jitter=jitter, shared_expert=shared_expert  # type: ignore[arg-type]
    )
    layer.router_context = router_context  # type: ignore[attr-defined]
    layer.num_sources = num_sources  # type: ignore[attr-defined]
    if num_sources:
        with torch.no_grad():
            _router_linear(layer).weight[:, width:].normal_(0.0, 1.0)
    return layer  # type: ignore[return-value]


def _router_linear(layer: TokenMoE) -> nn.Linear:
    """The router's input projection (its first linear layer)."""
    net = layer.router.net
    return net if isinstance(net, nn.Linear) else next(m for m in net.modules() if isinstance(m, nn.Linear))


@torch.no_grad()
def add_upcycle_noise(layer: TokenMoE, noise: float, generator: torch.Generator | None = None) -> None:
    """Perturb every routed expert's parameters by ``noise`` x their own spread, independently per expert.

    Each parameter tensor ``w`` of each routed expert becomes ``w + noise * std(w) * N(0, 1)``
    (``std`` over the tensor, the same for all experts, taken before any noise is added), so copies
    of one dense FFN start slightly apart and can diverge (the original SeisMoE's expert noise).
    The router and a shared expert are left as they are. ``noise == 0`` changes nothing.
    """
    if noise == 0.0:
        return
    experts = list(layer.experts)
    for params in zip(*(list(e.parameters()) for e in experts), strict=True):
        scale = params[0].float().std() if params[0].numel() > 1 else params[0].float().abs().reshape(())
        for p in params:
            p.add_((noise * scale * torch.randn(p.shape, generator=generator, dtype=torch.float32)).to(p.dtype))


@torch.no_grad()
def drop_upcycle(layer: TokenMoE, fraction: float, dense_hidden: int, generator: torch.Generator | None = None) -> None:
    """Drop-Upcycling (Nakamura et al., ICLR 2025): re-initialise a random ``fraction`` of every
    routed expert's hidden units, a different draw per expert.

    For each chosen hidden unit ``j`` the unit's ``lin1`` row and bias entry and its ``lin2``
    column get fresh values drawn from N(mean, std) of the dense FFN's tensor they belong to (its
    leading ``dense_hidden`` units, so the zero fan-out of `widen_into`'s extra units does not
    shrink the spread); ``lin2``'s bias is kept. Why: copies of one FFN get the same gradients
    until something breaks the symmetry, and small noise (`add_upcycle_noise`) breaks it slowly;
    re-initialising part of each expert makes the experts diverge from the first step while
    keeping most of the pretrained knowledge. The upcycled layer then computes what the dense FFN
    does only approximately. The router and a shared expert are left as they are; ``fraction`` 0
    changes nothing.
    """
    if fraction == 0.0:
        return
    for expert in layer.experts:
        lin1, lin2 = expert.lin1, expert.lin2
        hidden = lin1.out_features
        chosen = torch.randperm(hidden, generator=generator)[: round(fraction * hidden)]
        for tensor, dense_part, index_dim in (
            (lin1.weight, lin1.weight[:dense_hidden], 0),
            (lin1.bias, lin1.bias[:dense_hidden], 0),
            (lin2.weight, lin2.weight[:, :dense_hidden], 1),
        ):
            mean, std = dense_part.float().mean(), dense_part.float().std()
            shape = list(tensor.shape)
            shape[index_dim] = len(chosen)
            fresh = mean + std * torch.randn(shape, generator=generator, dtype=torch.float32)
            tensor.index_copy_(index_dim, chosen, fresh.to(tensor.dtype))


def _check_fraction(name: str, value: Any, meaning: str) -> None:
    """One ConfigError unless ``value`` is a number (not a boolean) in [0, 1)."""
    if not is_instance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1) ({meaning}), got {value!r}")


def _validate_moe_args(num_experts: Any, k: Any, gate: Any, router_jitter: Any, aux_loss: Any) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ConfigError(f"num_experts must be a positive integer, got {num_experts!r} (the guide recommends 4-16)")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ConfigError(
            f"num_experts_per_token must be an integer between 1 and num_experts={num_experts}, got {k!r}"
        )
    if gate not in GATES:
        raise ConfigError(f"gate must be one of {GATES}, got {gate!r}")
    if not isinstance(router_jitter, (int, float)) or not 0.0 <= float(router_jitter) < 1.0:
        raise ConfigError(f"router_jitter must be a number in [0, 1), got {router_jitter!r}")
    if aux_loss not in LOSS_KINDS:
        raise ConfigError(f"aux_loss must be one of {LOSS_KINDS}, got {aux_loss!r}")


class SeisMoE(EQTransformer):
    """EQTransformer with per-token top-k MoE feed-forward layers in both transformer blocks.

    :param num_experts: experts per MoE layer (E).
    :param num_experts_per_token: experts each token is sent to (k).
    :param gate: ``"topk_softmax"`` (softmax over the k chosen logits) or ``"softmax_topk"``.
    :param router_jitter: multiplicative router-input noise in training (0 = off).
    :param aux_loss: load-balance loss kind of `get_moe_loss` (``"switch"`` or ``"variance"``).
    :param detach_router_input: route on gradient-free token features, so the load-balance loss
        moves only the routers (guards detection against the aux loss; see `ChannelsFirstTokenMoE`).
    :param upcycle_noise: relative std of the noise added to every routed expert when dense weights
        are upcycled (`load_dense_state_dict`; see `add_upcycle_noise`), so the copies can diverge;
        0 (default): exact copies, the model computes what the dense model does. Weights of a
        trained SeisMoE are loaded as they are, without noise.
    :param upcycle_drop: fraction of every routed expert's hidden units re-initialised when dense
        weights are upcycled (Drop-Upcycling, `drop_upcycle`; a different draw per expert), in
        [0, 1); 0 (default): none. Applied before ``upcycle_noise``.
    :param shared_expert: add an always-on shared expert to each MoE layer (DeepSeek-MoE / DiT-MoE
        style), also a copy of the dense FFN when upcycling; each layer then outputs
        ``0.5 * shared(x) + 0.5 * routed(x)``, which is still the dense output at upcycling
        (with ``upcycle_noise`` 0), and holds one more FFN (+4,240 parameters per layer for the
        16 -> 128 -> 16 FFN).
    :param expert_hidden: hidden size of every expert FFN (null/None: the dense FFN's, 128). Larger
        experts are upcycled from the dense FFN without changing the output (`widen_into`): more
        capacity per expert than copies of EQTransformer's 4,240-parameter FFN can give.
    :param router_context: route each token on ``[token, mean of its trace's tokens]`` instead of
        the token alone, so the router knows what kind of window the token belongs to (see
        `ChannelsFirstTokenMoE`); the routers get twice as many inputs (+4 x 16 weights per layer
        at 4 experts). False (default): the token alone, as SeisMoE always routed.
    :param router_sources: names of the data sources (e.g. the ``trace_domain`` values of a pooled
        data set) the routers are told per trace, Task-MoE style: each router also sees a one-hot
        of the trace's source (`routed_by_source`; SeisMoELit passes the batch's ``source``, made
        from the metadata by `moelab.seismic.augment.SourceIndex`). A trace of another or unknown
        source -- a real record at inference -- gets an all-zero one-hot and is routed on its
        tokens alone. None (default): no source input.
    :param eqt_kwargs: EQTransformer's own arguments (in_samples, original_compatible, norm, ...).

    ``SeisMoE.from_base("stead", ...)`` starts from pretrained EQTransformer weights (see
    `moelab.seismic.weights`); the constructor alone gives a randomly initialised model.
    """

    def __init__(
        self,
        num_experts: int = 4,
        num_experts_per_token: int = 2,
        gate: str = "topk_softmax",
        router_jitter: float = 0.0,
        aux_loss: str = "switch",
        detach_router_input: bool = True,
        upcycle_noise: float = 0.0,
        shared_expert: bool = False,
        expert_hidden: int | None = None,
        upcycle_drop: float = 0.0,
        router_context: bool = False,
        router_sources: list[str] | None = None,
        **eqt_kwargs: Any,
    ) -> None:
        _validate_moe_args(num_experts, num_experts_per_token, gate, router_jitter, aux_loss)
        _check_fraction("upcycle_noise", upcycle_noise, "relative std of the expert noise; 0 = exact copies")
        _check_fraction("upcycle_drop", upcycle_drop, "fraction of each expert's hidden units re-initialised; 0 = none")
        for flag, value in (("shared_expert", shared_expert), ("router_context", router_context)):
            if not isinstance(value, bool):
                raise ConfigError(f"{flag} must be true or false, got {value!r}")
        if router_sources is not None:
            if not distinct_names(router_sources):
                raise ConfigError(
                    f"router_sources must be a non-empty list of distinct source names (the trace_domain values of the data), "
                    f"or null, got {router_sources!r}"
                )
            router_sources = list(router_sources)
        if expert_hidden is not None and (isinstance(expert_hidden, bool) or not isinstance(expert_hidden, int) or expert_hidden < 1):
            raise ConfigError(f"expert_hidden must be a positive integer or null (null: the dense FFN's 128), got {expert_hidden!r}")
        try:
            super().__init__(**eqt_kwargs)
        except TypeError as e:
            own = [n for n in inspect.signature(SeisMoE.__init__).parameters if n not in ("self", "eqt_kwargs")]
            eqt = [n for n in inspect.signature(EQTransformer.__init__).parameters if n not in ("self", "kwargs")]
            bad = [k for k in eqt_kwargs if k not in eqt and f"'{k}'" in str(e)]
            if bad:  # a misspelt MoE or EQTransformer argument: name the closest valid one
                raise unknown_key(f"SeisMoE argument '{bad[0]}'", bad[0], own + eqt) from None
            raise ConfigError(f"unknown EQTransformer argument for SeisMoE: {e}") from None
        except ValueError as e:
            raise ConfigError(f"invalid EQTransformer arguments for SeisMoE: {e}") from None
        self.num_experts = num_experts
        self.num_experts_per_token = num_experts_per_token
        self.gate = gate
        self.router_jitter = float(router_jitter)
        self.aux_loss = aux_loss
        self.detach_router_input = bool(detach_router_input)
        self.upcycle_noise = float(upcycle_noise)
        self.upcycle_drop = float(upcycle_drop)
        self.shared_expert = shared_expert
        self.expert_hidden = expert_hidden
        self.router_context = router_context
        self.router_sources = router_sources
        for name in MOE_BLOCKS:
            block = getattr(self, name)
            dense_hidden = block.ff.lin1.out_features
            if expert_hidden is not None and expert_hidden < dense_hidden:
                raise ConfigError(
                    f"expert_hidden={expert_hidden} is smaller than EQTransformer's feed-forward hidden size {dense_hidden}: "
                    f"experts are upcycled from that FFN, so use expert_hidden >= {dense_hidden} (or null)"
                )
            block.ff = upcycle_feedforward(
                block.ff, num_experts, num_experts_per_token, gate, self.router_jitter, shared_expert, expert_hidden, router_context,
                len(router_sources or ()),
            )
            block.ff.detach_router_input = self.detach_router_input

    # ----------------------------------------------------------------- building from dense weights
    @classmethod
    def from_eqtransformer(cls, dense: EQTransformer, **moe_kwargs: Any) -> "SeisMoE":
        """SeisMoE computing exactly what ``dense`` computes (experts upcycled from its FFNs).

        ``moe_kwargs``: the MoE arguments (num_experts, ...) plus any EQTransformer argument to
        override (it must still fit the dense weights).
        """
        moe = {k: v for k, v in moe_kwargs.items() if k in MOE_ARGS}
        eqt_args = {**dense.get_model_args(), **{k: v for k, v in moe_kwargs.items() if k not in MOE_ARGS}}
        model = cls(**moe, **eqt_args)
        model.load_dense_state_dict(dense.state_dict())
        model.default_args.update(copy.deepcopy(dense.default_args))
        model._weights_docstring = dense.weights_docstring
        model._weights_version = dense.weights_version
        return model

    @classmethod
    def from_base(cls, base_model: str | os.PathLike | None, **kwargs: Any) -> "SeisMoE":
        """SeisMoE started from ``base_model``: ``"stead"``/``"original"``/any SeisBench EQTransformer
        weight name, a local weights folder or file (see `moelab.seismic.weights`), or None/``"none"``
        for random initialisation.

        Dense EQTransformer weights are upcycled (outputs equal the dense model's at init); weights of
        a trained SeisMoE (router keys present) are loaded as they are. The architecture arguments
        stored with the weights are used; ``kwargs`` add the MoE arguments and may override others.
        """
        return cls.from_weights(load_base_weights(base_model), **kwargs)

    @classmethod
    def from_weights(cls, base: BaseWeights | None, **kwargs: Any) -> "SeisMoE":
        """`from_base` on weights already read (`moelab.seismic.weights.BaseWeights`; None: random)."""
        if base is None:
            return cls(**kwargs)
        model = cls(**{**base.model_args, **kwargs})
        if holds_moe(base.state_dict):
            try:
                model.load_state_dict(base.state_dict)
            except RuntimeError as e:
                raise CheckpointError(
                    f"SeisMoE weights from {base.source} do not fit num_experts={model.num_experts}, "
                    f"expert_hidden={model.expert_hidden}, shared_expert={model.shared_expert}, router_context={model.router_context}, "
                    f"router_sources={model.router_sources}: "
                    f"{load_error_detail(e)}; "
                    "use the MoE arguments they were trained with (their .json 'model_args')"
                ) from None
        else:
            model.load_dense_state_dict(base.state_dict)
        apply_metadata(model, base.metadata)
        return model

    def load_dense_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load a dense EQTransformer state dict: trunk as is, each FFN copied into every expert.

        The routers keep their initialisation; since each token's combine weights sum to one and
        all experts are equal, the model then computes what the dense model computed. A shared
        expert (``shared_expert``) gets the FFN too; with ``upcycle_drop`` > 0 part of each routed
        expert is then re-initialised (`drop_upcycle`) and with ``upcycle_noise`` > 0 the routed
        experts are perturbed (`add_upcycle_noise`), both from torch's global RNG, and the model
        computes what the dense model did only approximately.
        """
        own = self.state_dict()
        mapped: dict[str, Tensor] = {}
        unexpected: list[str] = []
        for key, value in state_dict.items():
            block = next((b for b in MOE_BLOCKS if key.startswith(f"{b}.ff.")), None)
            if block is None:
                (mapped.__setitem__(key, value) if key in own else unexpected.append(key))
                continue
            rest = key[len(f"{block}.ff."):]
            targets = [f"{block}.ff.experts.{e}.{rest}" for e in range(self.num_experts)]
            if self.shared_expert:
                targets.append(f"{block}.ff.shared_expert.{rest}")
            for target in targets:
                if target not in own:
                    unexpected.append(key)
                elif fits_into(value, own[target]):  # a copy of the FFN, widened to expert_hidden if wider
                    mapped[target] = widen_into(value, own[target], target)
                else:
                    mapped[target] = value  # refused with its shapes below
        missing = [k for k in own if k not in mapped and ".ff.router." not in k]
        if missing or unexpected:
            raise CheckpointError(
                "the base weights do not fit this EQTransformer architecture "
                f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                f"{sorted(set(unexpected))[:5]}{'...' if len(unexpected) > 5 else ''}); pass the model arguments stored "
                "with the weights (their .json 'model_args', e.g. original_compatible, lstm_blocks, in_samples)"
            )
        for key, value in mapped.items():
            if own[key].shape != value.shape:
                raise CheckpointError(
                    f"base weight '{key}' has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)}; "
                    "the model arguments do not match those the weights were trained with"
                )
        self.load_state_dict(mapped, strict=False)
        for name in MOE_BLOCKS:
            dense_hidden = state_dict[f"{name}.ff.lin1.weight"].shape[0]
            drop_upcycle(getattr(self, name).ff, self.upcycle_drop, dense_hidden)
            add_upcycle_noise(getattr(self, name).ff, self.upcycle_noise)

    # ----------------------------------------------------------------- MoE API of the user guide
    def get_moe_loss(self) -> Tensor:
        """Load-balance loss of the last forward, averaged over both MoE layers (core `model_aux_loss`)."""
        return model_aux_loss(self, kind=self.aux_loss)  # type: ignore[arg-type]

    def reset_moe_stats(self) -> None:
        """Clear the expert-usage counts of both MoE layers."""
        reset_moe_stats(self)

    def moe_usage(self) -> dict[str, dict]:
        """Per MoE layer (``transformer_d0.ff``, ``transformer_d.ff``): counts, shares, entropy."""
        return moe_usage(self)

    def moe_layers(self) -> list[TokenMoE]:
        return moe_layers(self)  # type: ignore[return-value]

    # ----------------------------------------------------------------- SeisBench model format
    def source_index(self, names: list[str | None]) -> Tensor:
        """Each name's position in ``router_sources`` (-1: unknown or None), as `routed_by_source` takes."""
        known = {n: i for i, n in enumerate(self.router_sources or ())}
        return torch.tensor([known.get(n, -1) if n is not None else -1 for n in names], dtype=torch.long)

    @contextmanager
    def routed_by_source(self, source: Tensor | None) -> Iterator[None]:
        """Within the block, each MoE layer's router is told each trace's data source:
        ``source`` ``[B]`` indices into ``router_sources`` (-1: unknown, an all-zero one-hot), or
        None (every trace unknown). A model without ``router_sources`` ignores it."""
        layers = [getattr(self, name).ff for name in MOE_BLOCKS]
        if not self.router_sources or source is None:
            yield
            return
        source = torch.as_tensor(source).reshape(-1).long()
        n = len(self.router_sources)
        if bool(((source < -1) | (source >= n)).any()):
            raise ValueError(f"source indices must be in [-1, {n - 1}] (positions in router_sources; -1 unknown), got {source.tolist()}")
        device = next(self.parameters()).device
        onehot = torch.zeros(source.shape[0], n, device=device)
        known = source >= 0
        onehot[known.nonzero().reshape(-1).to(device), source[known].to(device)] = 1.0
        for layer in layers:
            layer.source_onehot = onehot
        try:
            yield
        finally:
            for layer in layers:
                layer.source_onehot = None

    def get_model_args(self) -> dict[str, Any]:
        args = super().get_model_args()
        args.update(
            num_experts=self.num_experts,
            num_experts_per_token=self.num_experts_per_token,
            gate=self.gate,
            router_jitter=self.router_jitter,
            aux_loss=self.aux_loss,
            detach_router_input=self.detach_router_input,
            upcycle_noise=self.upcycle_noise,
            upcycle_drop=self.upcycle_drop,
            shared_expert=self.shared_expert,
            expert_hidden=self.expert_hidden,
            router_context=self.router_context,
            router_sources=self.router_sources,
        )
        return args

    def save(self, path: str | os.PathLike, weights_docstring: str = "", version_str: str | None = None) -> None:
        """SeisBench's ``save`` (``<path>.json`` + ``<path>.pt``), written atomically.

        Both files are first written under temporary names by SeisBench, then renamed into place,
        so an interrupted save never leaves a half-written pair.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        final_json, final_pt = self._get_weights_file_paths(path, version_str)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            tmp_base = Path(tmp) / path.name
            super().save(tmp_base, weights_docstring=weights_docstring, version_str=version_str)
            tmp_json, tmp_pt = self._get_weights_file_paths(tmp_base, version_str)
            os.replace(tmp_pt, final_pt)
            os.replace(tmp_json, final_json)

    @classmethod
    def load(cls, path: str | os.PathLike, version_str: str | None = None, **kwargs: Any) -> "SeisMoE":
        """Load a SeisMoE saved with `save` without running pickled code (``weights_only=True``)."""
        path_json, path_pt = cls._get_weights_file_paths(Path(path), version_str)
        if not path_json.is_file():
            raise CheckpointError(f"SeisMoE metadata '{path_json}' not found: pass the path given to save() (without .json/.pt)")
        try:
            metadata = json.loads(path_json.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"SeisMoE metadata '{path_json}' is not valid json ({e})") from None
        args = dict(metadata.get("model_args", {}))
        if "num_experts" not in args:
            raise CheckpointError(
                f"'{path_json}' describes a dense EQTransformer, not a SeisMoE; start a SeisMoE from it with "
                f"SeisMoE.from_base('{Path(path)}') (or base_model='{Path(path)}')"
            )
        cls._check_version_requirement(metadata)
        state = safe_load(path_pt, map_location=kwargs.get("map_location", "cpu"))
        model = cls(**args)
        model._weights_metadata = metadata
        model._parse_metadata()
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"weights '{path_pt}' do not fit the model described by '{path_json}': {load_error_detail(e)}") from None
        return model


# --------------------------------------------------------------------------------- trained models
def window_annotate_args(in_samples: int) -> dict[str, Any]:
    """SeisBench's EQTransformer ``annotate`` defaults (overlap 3000, blinding 500 of 6000 samples)
    scaled to a model window of ``in_samples``, so models trained on shorter windows pick continuous
    records too (an unscaled overlap of 3000 does not fit a window of 1001 samples)."""
    n = int(in_samples)
    return {"overlap": n // 2, "blinding": (n // 12, n // 12)}


def load_trained(path: str | os.PathLike) -> EQTransformer:
    """A trained SeisMoE or EQTransformer, in eval mode, from any file training or export writes.

    ``path``: a Lightning ``.ckpt`` of `SeisMoELit`/`EQTransformerLit`, or SeisBench weights (the
    ``DIR/NAME`` given to ``save``/``moelab seismic export``, either of its files, or its folder).
    Which model it is comes from the weights (`moelab.seismic.weights.holds_moe`); the architecture
    and the ``default_args`` stored with them (tuned thresholds) are used, and an ``overlap`` and
    ``blinding`` fitting the model window are added where the weights set none.
    """
    path = Path(path).expanduser()
    if not path.exists() and not (path.parent / f"{path.name}.json").is_file():
        raise CheckpointError(
            f"model '{path}' does not exist: pass a training checkpoint (weights/<name>/model.ckpt, written by "
            "benchmark/train.py) or exported SeisBench weights (DIR/NAME written by moelab seismic export)"
        )
    base = load_local(path)
    model = SeisMoE.from_weights(base) if holds_moe(base.state_dict) else eqtransformer_from(base)
    for key, value in window_annotate_args(model.in_samples).items():
        model.default_args.setdefault(key, value)
    return model.eval()
