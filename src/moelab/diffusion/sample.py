"""Class-conditional sampling with diffusers' schedulers and classifier-free guidance.

The sampler is always built from the *training* noise schedule (`noise.training_scheduler`), so a
checkpoint is sampled with exactly the betas it was trained with, whichever solver is chosen.
Guidance mixes a conditional and an unconditional (null-class) noise prediction,
``eps = eps_uncond + w * (eps_cond - eps_uncond)``; with ``w == 1`` that is ``eps_cond``, so the
unconditional pass is skipped and the result equals unguided sampling exactly.

There is one sampling loop, `generate`: `sample` (a model, its run config and a sampler name) and
`moelab.diffusion.pipeline.MoEFsDiCPipeline` (a model and any diffusers scheduler) both call it,
so a pipeline and `sample` given the same model, scheduler and seed produce the same images.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moelab.errors import ConfigError

SAMPLERS: dict[str, str] = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",  # DPM-Solver++(2M), deterministic (ODE)
    "dpm++sde": "DPMSolverMultistepScheduler",  # SDE-DPM-Solver++(2M), stochastic
}
_ALIASES = {"dpmpp": "dpm++", "dpm-solver++": "dpm++", "dpmsolver++": "dpm++", "dpm": "dpm++",
            "dpmpp-sde": "dpm++sde", "dpm++-sde": "dpm++sde", "sde-dpmsolver++": "dpm++sde"}


def canonical_sampler(name: str) -> str:
    """``'DPM++'``, ``'dpmpp'`` ... -> ``'dpm++'``; unknown names are a `ConfigError`."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{name}': use one of {', '.join(SAMPLERS)}")
    return key


#: Config keys of a diffusers scheduler that describe the *training* noise schedule (the rest are
#: solver settings).
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


def _base_schedule(source: Any) -> Any:
    """The training DDPM schedule of a run config, or of a diffusers scheduler (e.g. a pipeline's)."""
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from moelab.diffusion.noise import training_scheduler

    if isinstance(source, SchedulerMixin):
        conf = {k: source.config[k] for k in _SCHEDULE_KEYS if k in source.config}
        return DDPMScheduler(**conf, clip_sample=True)
    return training_scheduler(source)


def make_scheduler(config: Any, sampler: str = "dpm++", steps: int | None = None) -> Any:
    """A diffusers scheduler for ``sampler`` with the training betas, timesteps set to ``steps``.

    ``config``: the run config the model was trained with, or a diffusers scheduler carrying that
    training schedule (a pipeline's ``scheduler``).
    """
    import diffusers

    name = canonical_sampler(sampler)
    train_sched = _base_schedule(config)
    n_train = int(train_sched.config.num_train_timesteps)
    steps = n_train if steps is None else int(steps)
    if not 1 <= steps <= n_train:
        raise ConfigError(f"steps={steps} must be between 1 and the training schedule's {n_train} timesteps")
    cls = getattr(diffusers, SAMPLERS[name])
    extra: dict[str, Any] = {}
    if name in ("dpm++", "dpm++sde"):
        # thresholding with sample_max_value=1 clamps the x0 prediction to [-1, 1]: DPM-Solver++'s
        # counterpart of the DDPM/DDIM clip_sample the training schedule uses (pixel-space data)
        algo = "dpmsolver++" if name == "dpm++" else "sde-dpmsolver++"
        extra = {"algorithm_type": algo, "solver_order": 2, "thresholding": True, "sample_max_value": 1.0}
    elif name == "ddim":
        extra = {"set_alpha_to_one": False}
    sched = cls.from_config(dict(train_sched.config), **extra)
    if name != "ddpm" and getattr(train_sched.config, "trained_betas", None) is None:
        # same betas as training, whatever schedule name the solver would rebuild them from
        assert torch.allclose(sched.betas.double(), train_sched.betas.double()), "solver betas differ from training"
    sched.set_timesteps(steps)
    return sched


def parse_classes(spec: str | Sequence[int], num_classes: int) -> list[int]:
    """``'0-9'``, ``'1,3,5'``, ``'0-3,7'`` or ``'all'`` -> sorted unique class ids, validated."""
    if not isinstance(spec, str):
        ids = [int(c) for c in spec]
    elif spec.strip().lower() == "all":
        ids = list(range(num_classes))
    else:
        ids = []
        try:
            for part in spec.split(","):
                part = part.strip()
                if "-" in part:
                    a, b = (int(v) for v in part.split("-", 1))
                    if b < a:
                        raise ValueError
                    ids.extend(range(a, b + 1))
                else:
                    ids.append(int(part))
        except ValueError:
            raise ConfigError(f"classes='{spec}' is not a class list: write e.g. '0-9', '1,3,5' or 'all'") from None
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad or not ids:
        raise ConfigError(
            f"classes='{spec}': class ids must be between 0 and {num_classes - 1} (the model has {num_classes} classes)"
        )
    return sorted(set(ids))


def guided_eps(model: nn.Module, x: Tensor, t: Tensor, labels: Tensor, guidance: float, null_class: int) -> Tensor:
    """Classifier-free-guided noise prediction (one conditional pass when ``guidance == 1``)."""
    if guidance == 1.0:
        return model(x, t, labels)[0]
    null = torch.full_like(labels, null_class)
    eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))[0]
    cond, uncond = eps.chunk(2)
    return uncond + guidance * (cond - uncond)


def is_guidance_weight(w: float) -> bool:
    """Whether ``w`` can be a classifier-free guidance weight: finite and >= 0 (NaN or inf would fill
    every image with NaN). `generate` and `moelab.diffusion.compare` ask this one question."""
    return math.isfinite(w) and w >= 0


@torch.no_grad()
def generate(
    model: nn.Module,
    scheduler: Any,
    labels: Sequence[int] | Tensor,
    num_inference_steps: int,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """The sampling loop: one image per label, ``[N, C, H, W]`` in [-1, 1].

    ``model`` is MoEFsDiC or the dense baseline (``in_channels``, ``image_size``, ``num_classes``
    attributes; ``model(x, t, c)[0]`` is the noise prediction), ``scheduler`` any diffusers
    scheduler built on the training schedule. The initial noise of all N samples is drawn first
    from ``generator`` (a CPU generator), then the solver's own noise, batch after batch, from the
    same generator: the images depend only on the generator's seed, the labels, the batch size and
    the solver settings.
    """
    from diffusers import DDIMScheduler

    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    num_classes = int(model.num_classes)
    if labels.numel() == 0:
        raise ConfigError("nothing to sample: the label list is empty")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ConfigError(f"labels must be class ids in [0, {num_classes - 1}]")
    if not is_guidance_weight(guidance):
        raise ConfigError(f"guidance={guidance} must be a finite number >= 0 (1 = plain conditional sampling)")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    n_train = int(scheduler.config.num_train_timesteps)
    if not 1 <= int(num_inference_steps) <= n_train:
        raise ConfigError(f"num_inference_steps={num_inference_steps} must be between 1 and the schedule's {n_train} timesteps")
    device = torch.device(device)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    shape = (labels.numel(), int(model.in_channels), int(model.image_size), int(model.image_size))
    noise = torch.randn(shape, generator=gen)
    # DDIM: re-derive eps from the clipped x0 (as DPM-Solver++'s thresholding does); otherwise the
    # raw eps and the clipped x0 disagree and the deterministic update leaves noise in the image
    step_kw = {"use_clipped_model_output": True} if isinstance(scheduler, DDIMScheduler) else {}
    was_training = model.training
    model.eval()
    out = []
    try:
        n_batches = (labels.numel() + batch_size - 1) // batch_size
        for b in range(n_batches):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            scheduler.set_timesteps(int(num_inference_steps))  # also resets a multistep solver's history
            x = (noise[sl] * scheduler.init_noise_sigma).to(device)
            y = labels[sl].to(device)
            n_t = len(scheduler.timesteps)
            for i, t in enumerate(scheduler.timesteps):
                tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=device)
                xin = scheduler.scale_model_input(x, t)
                eps = guided_eps(model, xin, tt, y, float(guidance), num_classes)
                x = scheduler.step(eps, t, x, generator=gen, **step_kw).prev_sample
                if progress is not None:
                    progress(b * n_t + i + 1, n_batches * n_t)
            out.append(x.clamp(-1, 1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def sample(
    model: nn.Module,
    config: Any,
    labels: Sequence[int] | Tensor,
    sampler: str = "dpm++",
    steps: int | None = 20,
    guidance: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Generate one image per label, ``[N, C, H, W]`` in [-1, 1], reproducibly for a given ``seed``.

    ``config``: the run config the model was trained with (its noise schedule builds the
    ``sampler``; see `make_scheduler`). Equal to `generate` with ``torch.Generator().manual_seed(seed)``.
    """
    sched = make_scheduler(config, sampler, steps)
    n_steps = int(sched.config.num_train_timesteps) if steps is None else int(steps)
    gen = torch.Generator().manual_seed(int(seed))
    return generate(model, sched, labels, n_steps, guidance, gen, batch_size, device, progress)


def timed_sample(model: nn.Module, config: dict, labels: Sequence[int] | Tensor, **kw: Any) -> tuple[Tensor, float]:
    """`sample` plus the wall-clock seconds per generated image."""
    t0 = time.perf_counter()
    x = sample(model, config, labels, **kw)
    return x, (time.perf_counter() - t0) / x.shape[0]


def grid_labels(classes: Sequence[int], per_class: int) -> Tensor:
    """Labels laid out row by row: ``per_class`` copies of each class, classes in order."""
    return torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)


def to_uint8(images: Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> ``[N, H, W, C]`` uint8."""
    x = ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(
    images: Tensor,
    labels: Sequence[int] | Tensor,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    cell: int = 64,
    pad: int = 2,
) -> Path:
    """Write a PNG grid, one row per class (in order of first appearance), the class named on the left.

    Small images are upscaled with nearest-neighbour to ``cell`` pixels so they stay crisp.
    """
    from PIL import Image, ImageDraw, ImageFont

    labels = [int(v) for v in torch.as_tensor(labels).reshape(-1).tolist()]
    if len(labels) != images.shape[0]:
        raise ConfigError(f"{images.shape[0]} images but {len(labels)} labels")
    rows: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        rows.setdefault(c, []).append(i)
    arr = to_uint8(images)
    h, w = arr.shape[1:3]
    scale = max(1, cell // max(h, w))
    ch, cw = h * scale, w * scale
    ncols = max(len(v) for v in rows.values())
    font = ImageFont.load_default()
    names = {c: (class_names[c] if class_names is not None and c < len(class_names) else str(c)) for c in rows}
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(n, font=font)) for n in names.values()) + 8
    W = label_w + ncols * (cw + pad) + pad
    H = len(rows) * (ch + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (c, idx) in enumerate(rows.items()):
        y0 = pad + r * (ch + pad)
        draw.text((8, y0 + ch // 2 - 6), names[c], fill=(0, 0, 0), font=font)
        for j, i in enumerate(idx):
            im = arr[i]
            pil = Image.fromarray(im[..., 0], "L").convert("RGB") if im.shape[-1] == 1 else Image.fromarray(im[..., :3], "RGB")
            canvas.paste(pil.resize((cw, ch), Image.NEAREST), (label_w + pad + j * (cw + pad), y0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_npz(images: Tensor, labels: Sequence[int] | Tensor, path: str | Path) -> Path:
    """Samples as uint8 ``[N, H, W, C]`` plus their labels, the format FID tools read."""
    path = Path(path)
    if path.suffix != ".npz":  # numpy appends it; return the file actually written
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=to_uint8(images), labels=np.asarray(torch.as_tensor(labels).tolist(), dtype=np.int64))
    return path


def sample_checkpoint(
    checkpoint: str | Path,
    classes: str | Sequence[int] = "all",
    per_class: int = 8,
    ema: bool = True,
    **kw: Any,
) -> tuple[Tensor, Tensor, dict]:
    """Load a training checkpoint (EMA weights by default) and sample ``per_class`` images per class."""
    from moelab.diffusion.checkpoints import load_model

    model, config = load_model(checkpoint, ema=ema)
    cls = parse_classes(classes, config.model.num_classes)
    labels = grid_labels(cls, per_class)
    return sample(model, config, labels, **kw), labels, config
