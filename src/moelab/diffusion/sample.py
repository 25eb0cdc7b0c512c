"""Class-conditional sampling with diffusers' schedulers and classifier-free guidance.

The sampler is always built from the *training* noise schedule (`noise.training_scheduler`), so a
checkpoint is sampled with exactly the betas it was trained with, whichever solver is chosen.
Guidance mixes a conditional and an unconditional (null-class) noise prediction,
``eps = eps_uncond + w * (eps_cond - eps_uncond)``; with ``w == 1`` that is ``eps_cond``, so the
unconditional pass is skipped and the result equals unguided sampling exactly.
"""

from __future__ import annotations

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


def make_scheduler(config: dict, sampler: str = "dpm++", steps: int | None = None) -> Any:
    """A diffusers scheduler for ``sampler`` with the training betas, timesteps set to ``steps``."""
    import diffusers

    from moelab.diffusion.noise import training_scheduler

    name = canonical_sampler(sampler)
    train_sched = training_scheduler(config)
    n_train = int(train_sched.config.num_train_timesteps)
    steps = n_train if steps is None else int(steps)
    if not 1 <= steps <= n_train:
        raise ConfigError(f"--steps {steps} must be between 1 and the training schedule's {n_train} timesteps")
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
            raise ConfigError(f"--classes '{spec}' is not a class list: write e.g. '0-9', '1,3,5' or 'all'") from None
    bad = [c for c in ids if not 0 <= c < num_classes]
    if bad or not ids:
        raise ConfigError(
            f"--classes '{spec}': class ids must be between 0 and {num_classes - 1} (the model has {num_classes} classes)"
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


@torch.no_grad()
def sample(
    model: nn.Module,
    config: dict,
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

    The initial noise of all N samples is drawn once from a seeded generator, so the i-th sample
    only depends on the seed, the label list and the solver settings.
    """
    m = config["model"]
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise ConfigError("nothing to sample: the label list is empty")
    if int(labels.min()) < 0 or int(labels.max()) >= m["num_classes"]:
        raise ConfigError(f"labels must be class ids in [0, {m['num_classes'] - 1}]")
    if guidance < 0:
        raise ConfigError(f"--guidance {guidance} must be >= 0 (1 = plain conditional sampling)")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed))
    shape = (labels.numel(), m["in_channels"], m["image_size"], m["image_size"])
    noise = torch.randn(shape, generator=gen)
    was_training = model.training
    model.eval()
    out = []
    try:
        n_batches = (labels.numel() + batch_size - 1) // batch_size
        # DDIM: re-derive eps from the clipped x0 (as DPM-Solver++'s thresholding does); otherwise the
        # raw eps and the clipped x0 disagree and the deterministic update leaves noise in the image
        step_kw = {"use_clipped_model_output": True} if canonical_sampler(sampler) == "ddim" else {}
        for b in range(n_batches):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            sched = make_scheduler(config, sampler, steps)
            x = (noise[sl] * sched.init_noise_sigma).to(device)
            y = labels[sl].to(device)
            step_gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + b)
            for i, t in enumerate(sched.timesteps):
                tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=device)
                xin = sched.scale_model_input(x, t)
                eps = guided_eps(model, xin, tt, y, float(guidance), m["num_classes"])
                x = sched.step(eps, t, x, generator=step_gen, **step_kw).prev_sample
                if progress is not None:
                    progress(b * len(sched.timesteps) + i + 1, n_batches * len(sched.timesteps))
            out.append(x.clamp(-1, 1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=to_uint8(images), labels=np.asarray(torch.as_tensor(labels).tolist(), dtype=np.int64))
    return path


def load_for_inference(checkpoint: str | Path, ema: bool = True) -> tuple[nn.Module, dict]:
    """`lit.load_model` with a clear message for the commonest mistake, a wrong path."""
    from moelab.diffusion.lit import load_model
    from moelab.errors import CheckpointError

    p = Path(checkpoint)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise CheckpointError(
            f"--checkpoint '{p}' {what}: pass a checkpoint_epoch_N.pth file written by training "
            "(e.g. outputs/demo/checkpoints/checkpoint_epoch_100.pth)"
        )
    return load_model(p, ema=ema)


def sample_checkpoint(
    checkpoint: str | Path,
    classes: str | Sequence[int] = "all",
    per_class: int = 8,
    ema: bool = True,
    **kw: Any,
) -> tuple[Tensor, Tensor, dict]:
    """Load a training checkpoint (EMA weights by default) and sample ``per_class`` images per class."""
    model, config = load_for_inference(checkpoint, ema=ema)
    cls = parse_classes(classes, config["model"]["num_classes"])
    labels = grid_labels(cls, per_class)
    return sample(model, config, labels, **kw), labels, config
