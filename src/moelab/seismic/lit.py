"""Lightning modules for SeisMoE and its dense baseline, following SeisBench's pick-benchmark.

`EQTransformerLit` trains SeisBench's EQTransformer exactly as pick-benchmark does (weighted BCE on
detection, P and S; the same window, labelling and augmentation pipeline built from
``seisbench.generate``); `SeisMoELit` is the same module around a `SeisMoE`, adding
``moe_loss_coef`` x load-balance loss, optional freezing of everything but the MoE layers, and
per-epoch expert-usage logging. Both expose pick-benchmark's interface (``get_train_augmentations``,
``get_val_augmentations``, ``get_eval_augmentations``, ``predict_step``) so one harness trains and
evaluates both.

Guards against the detection collapse the original SeisMoE showed when fine-tuned on GEOFON:
the loss uses logits (BCE-with-logits never saturates, unlike BCE on sigmoid outputs), keeps
EQTransformer's weights (0.05, 0.40, 0.55), starts from experts upcycled from the pretrained FFN
(outputs identical to the pretrained model at step 0), keeps frozen BatchNorm statistics fixed
when ``freeze_non_moe`` or the dense control's ``freeze_non_ffn`` (otherwise the "frozen" trunk
drifts to the new data set), warns when ``moe_loss_coef`` exceeds the detection weight, warns at
the start of training when many traces have a P but no S pick while ``detection_fixed_window`` is
unset (their detection labels would be empty, pick-benchmark's reason for a fixed window on
GEOFON), and logs the detection loss separately.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import seisbench.generate as sbg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.checkpoint import load_error_detail
from moelab.errors import CheckpointError, ConfigError, check_finite_loss
from moelab.moe import freeze_except
from moelab.moe import freeze_non_moe as _freeze_non_moe
from moelab.moe import MoELayer, moe_layers, moe_usage, reset_moe_stats, trainable_report
from moelab.seismic.augment import DuplicateEvent, SourceIndex
from moelab.seismic.phases import P_PHASES, PHASE_DICT, S_PHASES  # noqa: F401  (PHASE_DICT re-exported)
from moelab.seismic.config import LR_SCHEDULES
from moelab.seismic.weights import read_lightning_checkpoint


class SeisBenchModuleLit(pl.LightningModule, ABC):
    """pick-benchmark's interface: augmentations for train/val/eval and a three-task ``predict_step``."""

    @abstractmethod
    def get_train_augmentations(self) -> list:
        """Augmentations for a ``seisbench.generate.GenericGenerator`` over training traces."""

    @abstractmethod
    def get_val_augmentations(self) -> list:
        """Augmentations for validation during training (no random perturbations)."""

    @abstractmethod
    def get_eval_augmentations(self) -> list:
        """Augmentations for a ``SteeredGenerator`` over an evaluation task's windows."""

    @abstractmethod
    def predict_step(self, batch: dict, batch_idx: int | None = None, dataloader_idx: int | None = None) -> tuple:
        """(score_detection, score_p_or_s, p_sample, s_sample) per window, within ``batch["window_borders"]``."""

    def get_augmentations(self) -> list:
        return self.get_train_augmentations()


class EQTransformerLit(SeisBenchModuleLit):
    """SeisBench EQTransformer trained as in pick-benchmark.

    :param lr: Adam learning rate.
    :param sigma: width (samples) of the Gaussian P/S labels (``ProbabilisticLabeller``).
    :param sample_boundaries: ``low``/``high`` of the ``RandomWindow`` selection.
    :param loss_weights: BCE weights of detection, P and S.
    :param rotate_array: randomly rotate waveforms and labels along time in training.
    :param detection_fixed_window: fixed detection length after P (samples) instead of P..S+1.4(S-P).
    :param base_model: starting weights: SeisBench name ("stead", "original", ...), local path, or None.
    :param freeze_non_ffn: train only the two transformer feed-forward networks (``transformer_d0.ff``,
        ``transformer_d.ff``), the layers SeisMoE turns into MoE layers: the dense control of
        SeisMoE's ``freeze_non_moe`` recipe (same frozen trunk, one dense FFN where SeisMoE has
        experts). Frozen BatchNorm statistics are kept fixed too.
    :param redo_every: every this many optimizer steps, recycle the decoder channels that have gone
        dormant on the batch (`moelab.seismic.dormant`, ReDo): for training from scratch, where a
        head can lose every channel that raises its probability and stay capped near 0.5.
        None (the default): never.
    :param redo_tau: dormancy threshold of ``redo_every``: mean activation at most this fraction of
        the layer's mean.
    :param head_prior: for training from scratch (``base_model`` None): start the P and S output
        convolutions' biases at ``-log((1 - prior) / prior)``, so that both pick heads first
        output about ``prior`` everywhere (the prior-probability initialisation of Lin et al.,
        2017, for sparse targets; their Gaussian labels cover about 1-2% of a window). From
        PyTorch's default bias (about 0) a pick head first learns to push its output down
        everywhere with inhibiting channels and can end capped near 0.5; from the prior, raising
        the output at an onset is what is left to learn. None: PyTorch's default.
    :param lr_schedule: ``"constant"`` (pick-benchmark's, the default), ``"linear"`` or
        ``"cosine"``: diffusers' schedules, stepped every optimizer step and reaching 0 at the run's
        last, so that the kept weights are not one point of a path still jittering at the full rate
        (fine-tuned on ``ethz_like_dense``: S MAE 14-23% lower, seed spread about halved).
    :param model_args: the resolved architecture, filled in automatically so that checkpoints
        rebuild the model without fetching ``base_model`` again; leave it unset.
    :param kwargs: EQTransformer arguments (in_samples, norm, ...), overriding those of the weights.
    """

    def __init__(
        self,
        lr: float = 1e-2,
        sigma: float = 20,
        sample_boundaries: Sequence[int | None] = (None, None),
        loss_weights: Sequence[float] = (0.05, 0.40, 0.55),
        rotate_array: bool = False,
        detection_fixed_window: int | None = None,
        base_model: str | os.PathLike | None = None,
        freeze_non_ffn: bool = False,
        redo_every: int | None = None,
        redo_tau: float = 0.025,
        head_prior: float | None = None,
        lr_schedule: str = "constant",
        model_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if isinstance(base_model, os.PathLike):  # checkpoints hold plain types only (weights_only loading)
            base_model = self.hparams["base_model"] = os.fspath(base_model)
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise ConfigError(f"lr must be a positive number, got {lr!r}")
        if len(loss_weights) != 3 or any(w < 0 for w in loss_weights):
            raise ConfigError(f"loss_weights must be three non-negative numbers (detection, P, S), got {loss_weights!r}")
        if len(sample_boundaries) != 2:
            raise ConfigError(f"sample_boundaries must be [low, high] (null for none), got {sample_boundaries!r}")
        if redo_every is not None and (isinstance(redo_every, bool) or not isinstance(redo_every, int) or redo_every < 1):
            raise ConfigError(f"redo_every must be a positive number of steps or null (never), got {redo_every!r}")
        if isinstance(redo_tau, bool) or not isinstance(redo_tau, (int, float)) or not 0 <= redo_tau < 1:
            raise ConfigError(f"redo_tau must be a fraction in [0, 1) of a layer's mean activation, got {redo_tau!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        self.redo_every, self.redo_tau = redo_every, float(redo_tau)
        self._redone_at = -1
        self.lr = float(lr)
        self.sigma = sigma
        self.sample_boundaries = tuple(sample_boundaries)
        self.loss_weights = tuple(float(w) for w in loss_weights)
        self.rotate_array = rotate_array
        self.detection_fixed_window = detection_fixed_window
        if model_args is not None:  # restoring a checkpoint: architecture known, weights follow
            self.model = self.build_model(None, **model_args)
        else:
            self.model = self.build_model(base_model, **kwargs)
        self.hparams["model_args"] = self.model.get_model_args()
        if head_prior is not None:
            if isinstance(head_prior, bool) or not isinstance(head_prior, (int, float)) or not 0 < head_prior < 1:
                raise ConfigError(f"head_prior must be a probability in (0, 1), e.g. 0.01, got {head_prior!r}")
            if base_model is not None:
                raise ConfigError("head_prior initialises the output biases of a model trained from scratch; with a base_model it would overwrite trained weights (drop one of them)")
            if model_args is None:  # a restored checkpoint loads its trained biases next
                from moelab.seismic.heads import decoder_chains

                with torch.no_grad():
                    for name, convs in decoder_chains(self.model):
                        if name in ("P", "S"):
                            convs[-1].bias.fill_(-math.log((1 - head_prior) / head_prior))
        self.freeze_non_ffn = bool(freeze_non_ffn)
        if self.freeze_non_ffn:
            from moelab.seismic.model import MOE_BLOCKS

            if base_model is None and model_args is None:
                warnings.warn("freeze_non_ffn=True with base_model=None freezes a randomly initialised trunk", stacklevel=2)
            ffns = [getattr(getattr(self.model, block, None), "ff", None) for block in MOE_BLOCKS]
            if any(not isinstance(ff, nn.Module) or moe_layers(ff) for ff in ffns):
                names = ", ".join(f"{b}.ff" for b in MOE_BLOCKS)
                raise ConfigError(f"freeze_non_ffn needs a dense EQTransformer (feed-forward networks {names}); for SeisMoE use freeze_non_moe")
            freeze_except(self.model, ffns)

    def build_model(self, base_model: str | os.PathLike | None, **kwargs: Any) -> nn.Module:
        from moelab.seismic.weights import build_eqtransformer

        return build_eqtransformer(base_model, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: Any = "cpu") -> "EQTransformerLit":
        """Module restored from a Lightning checkpoint without running pickled code or re-fetching weights."""
        state, hparams = read_lightning_checkpoint(path, map_location=map_location)
        try:
            module = cls(**hparams)
        except TypeError as e:
            raise CheckpointError(f"'{path}' was not written by {cls.__name__} ({e})") from None
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"'{path}' does not fit {cls.__name__}{hparams.get('model_args', '')}: {load_error_detail(e)}") from None
        return module

    # ------------------------------------------------------------------ training
    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.model(x)

    def moe_loss(self) -> Tensor:
        """Auxiliary loss added to the task loss (none for the dense model)."""
        return torch.zeros((), device=self.device)

    def moe_loss_coef_value(self) -> float:
        return 0.0

    def routing_context(self, batch: dict) -> contextlib.AbstractContextManager:
        """What the model is told about a batch besides its waveforms while it runs (nothing for
        EQTransformer; a source-aware SeisMoE's per-trace sources)."""
        return contextlib.nullcontext()

    def shared_step(self, batch: dict, stage: str) -> Tensor:
        x = batch["X"]
        with self.routing_context(batch):
            det_logit, p_logit, s_logit = self.model(x, logits=True)
        det = F.binary_cross_entropy_with_logits(det_logit, batch["detections"][:, 0])
        p = F.binary_cross_entropy_with_logits(p_logit, batch["y"][:, 0])
        s = F.binary_cross_entropy_with_logits(s_logit, batch["y"][:, 1])
        w = self.loss_weights
        task = w[0] * det + w[1] * p + w[2] * s
        aux = self.moe_loss()
        loss = task + self.moe_loss_coef_value() * aux
        on_step = stage == "train"
        sync = stage != "train"  # validation figures select the best checkpoint: mean over all DDP ranks
        n = x.shape[0]
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=sync)
        self.log_dict(
            {f"{stage}_task_loss": task, f"{stage}_det_loss": det, f"{stage}_p_loss": p, f"{stage}_s_loss": s},
            on_step=False, on_epoch=True, batch_size=n, sync_dist=sync,
        )
        if moe_layers(self.model):
            self.log(f"{stage}_moe_loss", aux, on_step=False, on_epoch=True, batch_size=n, sync_dist=sync)
        return loss

    def detection_label_warning(self, metadata: Any) -> str | None:
        """Why detection would collapse on this training set, or None.

        EQTransformer's detection label spans P..S+1.4(S-P) and is left empty when the S pick is
        missing; on a data set where many traces have P but no S (GEOFON), most event windows then
        teach "no event" and the detection output collapses to zero. pick-benchmark avoids this
        with ``detection_fixed_window`` (2000 samples for GEOFON).
        """
        if self.detection_fixed_window is not None or not hasattr(metadata, "columns"):
            return None
        p_cols = [c for c in P_PHASES if c in metadata.columns]
        s_cols = [c for c in S_PHASES if c in metadata.columns]
        if not p_cols:
            return None
        has_p = metadata[p_cols].notna().any(axis=1)
        has_s = metadata[s_cols].notna().any(axis=1) if s_cols else has_p & False
        n_p = int(has_p.sum())
        frac = float((has_p & ~has_s).sum()) / n_p if n_p else 0.0
        if frac <= 0.2:
            return None
        return (
            f"{frac:.0%} of the training traces with a P pick have no S pick: with detection_fixed_window unset their "
            "detection label is empty, which drives the detection output to zero (the collapse seen on GEOFON); "
            "set model_args.detection_fixed_window (pick-benchmark uses 2000 samples for GEOFON)"
        )

    def on_train_start(self) -> None:
        # Lightning 2.x never calls .train() on the module during fit (it restores each submodule's
        # own mode after validation), so the override below must be applied here, before the first
        # batch, or a frozen trunk's BatchNorm statistics drift to the new data.
        self.train(True)
        loader = self.trainer.train_dataloader
        generator = getattr(loader, "dataset", None)
        message = self.detection_label_warning(getattr(getattr(generator, "dataset", None), "metadata", None))
        if message:
            warnings.warn(message, stacklevel=2)

    def recycle_dormant(self, batch: dict) -> dict[str, int]:
        """`moelab.seismic.dormant.recycle_dormant` on this batch, the same on every DDP rank."""
        from moelab.seismic.dormant import recycle_dormant

        opt = self.optimizers()
        opt = getattr(opt, "optimizer", opt)
        strategy = self.trainer.strategy
        counts = recycle_dormant(
            self.model,
            batch["X"],
            tau=self.redo_tau,
            generator=torch.Generator().manual_seed(1_000_003 + self.global_step),
            optimizer=opt,
            all_reduce=lambda t: strategy.reduce(t, reduce_op="sum"),
        )
        self.log_dict({f"train_recycled_{head}": float(n) for head, n in counts.items()}, on_step=False, on_epoch=True, reduce_fx="sum")
        return counts

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        step = self.global_step
        if self.redo_every and step > 0 and step % self.redo_every == 0 and step != self._redone_at:
            self._redone_at = step  # once per optimizer step, also under gradient accumulation
            with self.routing_context(batch):
                self.recycle_dormant(batch)
        loss = self.shared_step(batch, "train")
        check_finite_loss(
            self.global_step,
            "lower model_args.lr, check the input data for NaN/Inf samples, or lower moe_loss_coef",
            loss=float(loss.detach()),
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self.shared_step(batch, "val")

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the trainable parameters (pick-benchmark's optimizer)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr)

    def configure_optimizers(self) -> Any:
        """`make_optimizer`; with ``lr_schedule`` other than ``"constant"`` (pick-benchmark trains at
        a constant rate) every group's rate follows diffusers' schedule of that name over the run's
        optimizer steps, down to 0 at the last one, so the final weights are not one point of a
        trajectory that still jitters at the full rate."""
        opt = self.make_optimizer()
        if self.lr_schedule == "constant":
            return opt
        from diffusers.optimization import get_scheduler

        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = get_scheduler(self.lr_schedule, opt, num_warmup_steps=0, num_training_steps=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @property
    def frozen_trunk(self) -> bool:
        """Whether a fine-tuning recipe froze all but a few layers (``freeze_non_ffn`` / ``freeze_non_moe``)."""
        return bool(getattr(self, "freeze_non_ffn", False) or getattr(self, "freeze_non_moe", False))

    def train(self, mode: bool = True) -> "EQTransformerLit":
        """With a frozen trunk, frozen BatchNorm layers stay in eval mode so that their running
        statistics stay the pretrained ones (otherwise the "frozen" trunk drifts to the new data)."""
        super().train(mode)
        if mode and self.frozen_trunk:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                    m.eval()
        return self

    # ------------------------------------------------------------------ data pipeline (pick-benchmark)
    @property
    def in_samples(self) -> int:
        return int(self.model.in_samples)

    def _detection_labeller(self) -> Any:
        if self.detection_fixed_window is not None:
            return sbg.DetectionLabeller(P_PHASES, fixed_window=self.detection_fixed_window, key=("X", "detections"))
        return sbg.DetectionLabeller(P_PHASES, s_phases=S_PHASES, key=("X", "detections"))

    def get_joint_augmentations(self) -> tuple[list, list]:
        n = self.in_samples
        windowing = [
            # 2/3: a window around a pick (variable length, padded below); 1/3: the trace as it is.
            sbg.OneOf(
                [
                    sbg.WindowAroundSample(list(PHASE_DICT), samples_before=n, windowlen=2 * n, selection="random", strategy="variable"),
                    sbg.NullAugmentation(),
                ],
                probabilities=[2, 1],
            ),
            sbg.RandomWindow(low=self.sample_boundaries[0], high=self.sample_boundaries[1], windowlen=n, strategy="pad"),
            sbg.ProbabilisticLabeller(label_columns=PHASE_DICT, sigma=self.sigma, dim=0),
            self._detection_labeller(),
            sbg.Normalize(detrend_axis=-1, amp_norm_axis=-1, amp_norm_type="peak"),
        ]
        dtype = [sbg.ChangeDtype(np.float32, key) for key in ("X", "y", "detections")]
        return windowing, dtype

    def get_train_augmentations(self) -> list:
        rotation = (
            [sbg.OneOf([sbg.RandomArrayRotation(["X", "y", "detections"]), sbg.NullAugmentation()], [0.99, 0.01])]
            if self.rotate_array
            else []
        )
        perturb = [
            sbg.OneOf([DuplicateEvent(label_keys=["y"]), sbg.NullAugmentation()], probabilities=[0.3, 0.7]),
            sbg.OneOf([sbg.GaussianNoise(), sbg.NullAugmentation()], [0.5, 0.5]),
            *rotation,
            sbg.OneOf([sbg.AddGap(), sbg.NullAugmentation()], [0.2, 0.8]),
            sbg.OneOf([sbg.ChannelDropout(), sbg.NullAugmentation()], [0.3, 0.7]),
            sbg.Normalize(detrend_axis=-1, amp_norm_axis=-1, amp_norm_type="peak"),
        ]
        windowing, dtype = self.get_joint_augmentations()
        return windowing + perturb + dtype

    def get_val_augmentations(self) -> list:
        windowing, dtype = self.get_joint_augmentations()
        return windowing + dtype

    def get_eval_augmentations(self) -> list:
        return [
            sbg.SteeredWindow(windowlen=self.in_samples, strategy="pad"),
            sbg.ChangeDtype(np.float32),
            sbg.Normalize(detrend_axis=-1, amp_norm_axis=-1, amp_norm_type="peak"),
        ]

    def predict_step(self, batch: dict, batch_idx: int | None = None, dataloader_idx: int | None = None) -> tuple:
        with self.routing_context(batch):
            det, p, s = self.model(batch["X"])
        borders = torch.as_tensor(batch["window_borders"], device=det.device).reshape(-1, 2).long()
        start, end = borders[:, :1], borders[:, 1:]
        idx = torch.arange(det.shape[-1], device=det.device)[None]
        outside = (idx < start) | (idx >= end)
        det, p, s = (t.masked_fill(outside, float("-inf")) for t in (det, p, s))
        p_max, p_arg = p.max(dim=-1)
        s_max, s_arg = s.max(dim=-1)
        score_detection = det.max(dim=-1).values
        score_p_or_s = p_max / s_max  # most likely P over most likely S
        return score_detection, score_p_or_s, p_arg - start[:, 0], s_arg - start[:, 0]


class SeisMoELit(EQTransformerLit):
    """`EQTransformerLit` around a `SeisMoE`: the user guide's arguments plus pick-benchmark's.

    :param base_model: pretrained EQTransformer to upcycle ("stead", "original", path, or None).
    :param num_experts: experts per MoE layer.
    :param num_experts_per_token: experts each token is sent to (k).
    :param moe_loss_coef: weight of the load-balance loss (guide: 0.01 full training, 0.02 fine-tuning).
    :param freeze_non_moe: train only routers and experts (fine-tuning); frozen BatchNorm
        statistics are kept fixed too.
    :param lr: Adam learning rate (guide: 1e-3 full training, 5e-4 fine-tuning).
    :param router_lr: learning rate of the routers alone (None: ``lr``); upcycled experts start as
        copies, so routers that learn faster than the experts can split the work sooner.
    :param expert_lr: learning rate of the routed experts alone (None: ``lr``); the other half of
        "separate learning rates for router and experts": upcycled copies that move faster than the
        trunk may drift apart and specialise sooner.
    :param kwargs: `EQTransformerLit` arguments (sigma, loss_weights, ...) and model arguments
        (gate, router_jitter, aux_loss, in_samples, ...).
    """

    def __init__(
        self,
        base_model: str | os.PathLike | None = None,
        num_experts: int = 4,
        num_experts_per_token: int = 2,
        moe_loss_coef: float = 0.01,
        freeze_non_moe: bool = False,
        lr: float = 1e-3,
        router_lr: float | None = None,
        expert_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(moe_loss_coef, (int, float)) or moe_loss_coef < 0:
            raise ConfigError(f"moe_loss_coef must be a non-negative number, got {moe_loss_coef!r}")
        for name, value in (("router_lr", router_lr), ("expert_lr", expert_lr)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(f"{name} must be a positive number or null (same as lr), got {value!r}")
        self.router_lr = None if router_lr is None else float(router_lr)
        self.expert_lr = None if expert_lr is None else float(expert_lr)
        self._moe_args = {"num_experts": num_experts, "num_experts_per_token": num_experts_per_token}
        super().__init__(lr=lr, base_model=base_model, **kwargs)
        self.moe_loss_coef = float(moe_loss_coef)
        if self.moe_loss_coef > self.loss_weights[0]:
            warnings.warn(
                f"moe_loss_coef={self.moe_loss_coef} exceeds the detection loss weight {self.loss_weights[0]}: the "
                "load-balance term may dominate detection (the guide recommends 0.01-0.02)",
                stacklevel=2,
            )
        self.freeze_non_moe = bool(freeze_non_moe)
        if self.freeze_non_moe:
            if base_model is None and kwargs.get("model_args") is None:
                warnings.warn("freeze_non_moe=True with base_model=None freezes a randomly initialised trunk", stacklevel=2)
            _freeze_non_moe(self.model)
        self._val_snapshot: dict[str, Tensor] | None = None

    def build_model(self, base_model: str | os.PathLike | None, **kwargs: Any) -> nn.Module:
        from moelab.seismic.model import SeisMoE

        return SeisMoE.from_base(base_model, **{**self._moe_args, **kwargs})

    # a source-aware model (``router_sources``) gets each trace's source in every batch
    def _source(self) -> list:
        names = getattr(self.model, "router_sources", None)
        return [SourceIndex(names)] if names else []

    def get_train_augmentations(self) -> list:
        return super().get_train_augmentations() + self._source()

    def get_val_augmentations(self) -> list:
        return super().get_val_augmentations() + self._source()

    def get_eval_augmentations(self) -> list:
        return super().get_eval_augmentations() + self._source()

    def routing_context(self, batch: dict) -> contextlib.AbstractContextManager:
        """A source-aware SeisMoE is told the batch's ``source`` (unknown for every trace without one)."""
        return self.model.routed_by_source(batch.get("source"))

    def moe_loss(self) -> Tensor:
        return self.model.get_moe_loss()

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam; with ``router_lr`` the router parameters, with ``expert_lr`` the routed experts'
        parameters form a group of their own (groups in that order, after the rest)."""
        if self.router_lr is None and self.expert_lr is None:
            return super().make_optimizer()
        own = {".router.": self.router_lr, ".experts.": self.expert_lr}
        own = {key: lr for key, lr in own.items() if lr is not None}
        groups: dict[str, list[Tensor]] = {"": [], **{key: [] for key in own}}
        for n, p in self.named_parameters():
            if p.requires_grad:
                groups[next((key for key in own if key in n), "")].append(p)
        lrs = {"": self.lr, **own}
        return torch.optim.Adam([{"params": ps, "lr": lrs[key]} for key, ps in groups.items() if ps], lr=self.lr)

    def moe_loss_coef_value(self) -> float:
        return self.moe_loss_coef

    def trainable_report(self) -> Any:
        return trainable_report(self.model)

    # ------------------------------------------------------------------ expert usage per epoch
    def _log_usage(self, prefix: str) -> None:
        """Per-layer usage of the epoch, counts summed over DDP ranks (every rank calls this at epoch end)."""
        metrics: dict[str, float] = {}
        for name, s in moe_usage(self.model, across_ranks=True).items():
            if not s["total"]:
                continue
            metrics[f"{prefix}/{name}/entropy"] = s["entropy"]
            metrics[f"{prefix}/{name}/max_share"] = s["max_share"]
            metrics[f"{prefix}/{name}/min_share"] = s["min_share"]
            for e, c in enumerate(s["counts"]):
                metrics[f"{prefix}/{name}/share_e{e}"] = c / s["total"]
        if metrics:  # already global; sync_dist averages identical values and keeps Lightning's DDP check quiet
            self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def on_train_epoch_start(self) -> None:
        reset_moe_stats(self.model)

    def on_train_epoch_end(self) -> None:
        self._log_usage("train_moe")

    def on_validation_epoch_start(self) -> None:
        # Validation counts are kept apart: the training counts are put aside and restored after.
        self._val_snapshot = {n: m.usage.counts.clone() for n, m in self.model.named_modules() if isinstance(m, MoELayer)}
        reset_moe_stats(self.model)

    def on_validation_epoch_end(self) -> None:
        self._log_usage("val_moe")
        if self._val_snapshot is not None:
            for name, m in self.model.named_modules():
                if name in self._val_snapshot:
                    m.usage.counts.copy_(self._val_snapshot[name])
            self._val_snapshot = None
