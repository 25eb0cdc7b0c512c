"""`MoEFsDiCPipeline`: class-conditional sampling as a diffusers `DiffusionPipeline`.

``pipe = MoEFsDiCPipeline.from_pretrained(folder)``, then
``pipe(class_labels=[0, 1, 2], guidance_scale=1.25, num_inference_steps=20,
generator=torch.Generator().manual_seed(0)).images``. The denoiser is `MoEFsDiC_UNet` (or the
dense baseline), the scheduler any diffusers scheduler on the training noise schedule; swap it the
usual way, ``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``. The loop is
`moelab.diffusion.sample.generate`, the same one `sample` runs.

`export_pipeline` writes a pipeline folder (``model_index.json``, ``unet/`` with ``config.json`` +
safetensors, ``scheduler/``) from a training checkpoint, EMA weights by default.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn

from moelab.checkpoint import load_error_detail
from moelab.diffusion.checkpoints import load_model
from moelab.diffusion.sample import generate, make_scheduler
from moelab.errors import CheckpointError, ConfigError
from moelab.validation import check_output

#: The scheduler an exported pipeline carries: 20-step SDE-DPM-Solver++(2M), the demo's sampler.
EXPORT_SAMPLER = "dpm++sde"
OUTPUT_TYPES = ("pil", "np", "pt")


class MoEFsDiCPipeline(DiffusionPipeline):
    """Class-conditional image generation with classifier-free guidance.

    Args:
        unet (`MoEFsDiC_UNet` or `DenseUNet2D`): the trained denoiser (``model(x, t, c)[0]`` is the
            noise prediction; class id ``num_classes`` is the null class used for guidance).
        scheduler (`SchedulerMixin`): a diffusers scheduler built on the schedule the model was
            trained with, e.g. `moelab.diffusion.sample.make_scheduler(config, "dpm++sde")`.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: nn.Module, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | Tensor,
        guidance_scale: float = 1.25,
        num_inference_steps: int = 20,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int = 256,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Generate one image per class label.

        Args:
            class_labels (`Sequence[int]` or `Tensor`): class id of each image, in
                ``[0, num_classes)``.
            guidance_scale (`float`, defaults to 1.25): classifier-free guidance weight w
                (``eps_uncond + w * (eps_cond - eps_uncond)``); 1 runs only the conditional pass.
            num_inference_steps (`int`, defaults to 20): solver steps.
            generator (`torch.Generator`, *optional*): a CPU generator for the initial noise and the
                solver's noise; default: one seeded from torch's global RNG (so ``torch.manual_seed``
                makes a call reproducible).
            output_type (`str`, defaults to `"pil"`): `"pil"` (list of PIL images), `"np"`
                (``[N, H, W, C]`` float array in [0, 1]) or `"pt"` (``[N, C, H, W]`` tensor in [0, 1]).
            return_dict (`bool`, defaults to `True`): an `ImagePipelineOutput`, else a 1-tuple.
            batch_size (`int`, defaults to 256): images denoised at once.
        """
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type={output_type!r} is not allowed; use one of: {', '.join(OUTPUT_TYPES)}")
        if isinstance(generator, list):
            raise ConfigError("generator must be one torch.Generator (the noise of all images is drawn from it in order), not a list")
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        images = generate(
            self.unet, self.scheduler, class_labels, num_inference_steps, guidance_scale, generator, batch_size, self.device
        )
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out: Any = images
        else:
            out = images.permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)


def export_pipeline(checkpoint: str | Path, out_dir: str | Path, ema: bool = True, sampler: str = EXPORT_SAMPLER) -> Path:
    """Write a `MoEFsDiCPipeline` folder from a training checkpoint; returns the folder.

    The folder is written next to its destination and renamed into place, so an interrupted
    export never leaves a half-written pipeline where a complete one is expected.
    """
    out = Path(out_dir)
    check_output("out_dir", out, folder=True)  # a file, or a path under one
    model, cfg = load_model(checkpoint, ema=ema)
    pipe = MoEFsDiCPipeline(unet=model, scheduler=make_scheduler(cfg, sampler))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_pipeline_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by `export_pipeline` / ``save_pretrained``."""
    return (Path(path) / "model_index.json").is_file()


def load_pipeline(folder: str | Path) -> MoEFsDiCPipeline:
    """`MoEFsDiCPipeline.from_pretrained` for a local folder, with a clear error when it is not one."""
    p = Path(folder)
    if not is_pipeline_folder(p):
        what = "does not exist" if not p.exists() else "has no model_index.json"
        raise CheckpointError(f"pipeline folder '{p}' {what}: pass a folder written by `moelab diffusion export` (or save_pretrained)")
    try:
        return MoEFsDiCPipeline.from_pretrained(p, low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"pipeline folder '{p}' could not be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    except RuntimeError as e:  # torch's load_state_dict: the weights do not fit unet/config.json
        raise CheckpointError(
            f"pipeline folder '{p}': the weights in unet/ do not fit its unet/config.json ({load_error_detail(e)}); "
            "re-export it with `moelab diffusion export` and do not edit config.json by hand"
        ) from None


def load_denoiser(source: str | Path, ema: bool = True) -> tuple[nn.Module, Any]:
    """The model to sample and what its noise schedule comes from, from either kind of file.

    ``source``: a training checkpoint (returns the model, EMA weights unless ``ema=False``, and its
    `RunConfig`) or a pipeline folder (returns its ``unet`` and ``scheduler``, which carries the
    training schedule). Either second value is what `sample` / `make_scheduler` take.
    """
    p = Path(source)
    if is_pipeline_folder(p):
        if not ema:
            raise ConfigError(f"ema=False applies to training checkpoints; pipeline folder '{p}' holds only the weights it was exported with")
        pipe = load_pipeline(p)
        return pipe.unet.eval(), pipe.scheduler
    return load_model(p, ema=ema)
