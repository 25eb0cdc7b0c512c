"""MoEFsDiCPipeline: same images as `sample`, folder round trip, scheduler swap, output types, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, ImagePipelineOutput
from PIL import Image

from moelab.cli import main
from moelab.diffusion.config import load_config
from moelab.diffusion.lit import MoEFsDiCLit
from moelab.diffusion.models import build_model
from moelab.diffusion.noise import training_scheduler
from moelab.diffusion.pipeline import MoEFsDiCPipeline, export_pipeline, load_denoiser, load_pipeline
from moelab.diffusion.sample import make_scheduler, sample
from moelab.errors import CheckpointError, ConfigError

TINY = {"model": {"in_channels": 1, "model_channels": 8, "channel_mults": [1], "image_size": 8, "num_classes": 3},
        "moe": {"num_experts": 4, "k_active": 2, "router_hidden": 8},
        "diffusion": {"num_train_timesteps": 100}}
LABELS = [0, 1, 2, 2, 0]


def perturbed(model, seed=0, scale=0.05):
    """Untrained weights made non-trivial (some layers start at zero), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY)


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return perturbed(build_model(cfg.model))


def pipe_for(model, cfg, sampler="dpm++sde"):
    return MoEFsDiCPipeline(unet=model, scheduler=make_scheduler(cfg, sampler))


@pytest.mark.parametrize("sampler,steps,guidance,batch", [("dpm++sde", 6, 1.25, 256), ("ddpm", 6, 2.0, 2), ("dpm++", 5, 1.0, 3)])
def test_pipeline_gives_the_images_sample_gives(model, cfg, sampler, steps, guidance, batch):
    pipe = pipe_for(model, cfg, sampler)
    out = pipe(class_labels=LABELS, guidance_scale=guidance, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(3), output_type="pt", batch_size=batch)
    assert isinstance(out, ImagePipelineOutput)
    ref = sample(model, cfg, LABELS, sampler=sampler, steps=steps, guidance=guidance, seed=3, batch_size=batch)
    assert torch.equal(out.images, (ref / 2 + 0.5).clamp(0, 1))
    again = pipe(class_labels=LABELS, guidance_scale=guidance, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(4), output_type="pt", batch_size=batch).images
    assert not torch.equal(out.images, again)  # the generator decides the images


def test_output_types(model, cfg):
    pipe = pipe_for(model, cfg)
    kw = dict(class_labels=LABELS, num_inference_steps=4)
    pt = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    arr = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    pil = pipe(generator=torch.Generator().manual_seed(0), output_type="pil", **kw).images
    (tup,) = pipe(generator=torch.Generator().manual_seed(0), output_type="np", return_dict=False, **kw)
    assert pt.shape == (5, 1, 8, 8) and arr.shape == (5, 8, 8, 1) and arr.dtype == np.float32
    assert 0 <= arr.min() and arr.max() <= 1
    np.testing.assert_array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(tup, arr)
    assert len(pil) == 5 and all(isinstance(im, Image.Image) and im.size == (8, 8) and im.mode == "L" for im in pil)
    np.testing.assert_array_equal(np.asarray(pil[1]), (arr[1, ..., 0] * 255).round().astype(np.uint8))
    with pytest.raises(ConfigError, match="output_type='latent' is not allowed"):
        pipe(output_type="latent", **kw)
    with pytest.raises(ConfigError, match="labels must be class ids in \\[0, 2\\]"):
        pipe(class_labels=[3], num_inference_steps=2)
    with pytest.raises(ConfigError, match="num_inference_steps=101 must be between 1"):
        pipe(class_labels=[0], num_inference_steps=101)
    # without a generator the call follows torch's global seed
    torch.manual_seed(5)
    a = pipe(output_type="pt", **kw).images
    torch.manual_seed(5)
    assert torch.equal(a, pipe(output_type="pt", **kw).images)


def test_folder_round_trip_and_scheduler_swap(model, cfg, tmp_path):
    pipe = pipe_for(model, cfg)
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_pipeline(tmp_path / "pipe")
    assert type(loaded.unet) is type(model) and loaded.unet.model_config == model.model_config
    kw = dict(class_labels=LABELS, guidance_scale=1.25, num_inference_steps=6, output_type="pt")
    a = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, loaded(generator=torch.Generator().manual_seed(0), **kw).images)

    loaded.scheduler = DDIMScheduler.from_config(loaded.scheduler.config)  # the usual diffusers swap
    assert torch.allclose(loaded.scheduler.betas.double(), training_scheduler(cfg).betas.double())
    b = loaded(generator=torch.Generator().manual_seed(0), **kw).images
    assert b.shape == a.shape and not torch.equal(a, b)
    assert torch.equal(b, loaded(generator=torch.Generator().manual_seed(0), **kw).images)
    # a scheduler rebuilt from the pipeline's config is the same sampler `make_scheduler` builds from the run config
    from_pipe = make_scheduler(loaded.scheduler, "ddpm", 10)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert isinstance(from_pipe, DDPMScheduler) and public(from_pipe.config) == public(make_scheduler(cfg, "ddpm", 10).config)


def write_checkpoint(path, cfg, seed=0):
    lit = MoEFsDiCLit(cfg)
    perturbed(lit.model, seed)
    ema = {f"model.{k}": v for k, v in lit.model.state_dict().items()}
    raw = {k: v + 1.0 if v.is_floating_point() else v for k, v in ema.items()}
    torch.save({"state_dict": ema, "current_model_state": raw, "hyper_parameters": {"config": cfg.to_dict()},
                "epoch": 0, "global_step": 1, "optimizer_states": []}, path)
    return ema, raw


def test_export_writes_the_ema_weights_and_the_cli_samples_either_source(cfg, tmp_path, capsys):
    ck = tmp_path / "checkpoint_epoch_1.pth"
    ema, raw = write_checkpoint(ck, cfg)
    out = export_pipeline(ck, tmp_path / "pipe")
    pipe = load_pipeline(out)
    assert all(torch.equal(v, ema[f"model.{k}"]) for k, v in pipe.unet.state_dict().items())
    assert isinstance(pipe.scheduler, type(make_scheduler(cfg, "dpm++sde")))
    raw_pipe = load_pipeline(export_pipeline(ck, tmp_path / "pipe", ema=False))  # replaces the folder
    assert all(torch.equal(v, raw[f"model.{k}"]) for k, v in raw_pipe.unet.state_dict().items())
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left

    assert main(["diffusion", "export", "--checkpoint", str(ck), "--out", str(tmp_path / "cli_pipe")]) == 0
    assert "pipeline: " in capsys.readouterr().out
    common = ["--classes", "0-2", "--per-class", "2", "--steps", "4", "--seed", "1"]
    assert main(["diffusion", "sample", "--checkpoint", str(ck), "--out", str(tmp_path / "a.png"), "--npz", str(tmp_path / "a.npz"), *common]) == 0
    assert main(["diffusion", "sample", "--pipeline", str(tmp_path / "cli_pipe"), "--out", str(tmp_path / "b.png"),
                 "--npz", str(tmp_path / "b.npz"), *common]) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    capsys.readouterr()
    assert main(["diffusion", "sample", "--checkpoint", str(tmp_path / "cli_pipe"), "--no-ema"]) == 2
    assert "ema=False applies to training checkpoints" in capsys.readouterr().err


def test_bad_sources(tmp_path):
    with pytest.raises(CheckpointError, match="pipeline folder '.*nothere' does not exist"):
        load_pipeline(tmp_path / "nothere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint '.*empty' is a folder: pass a checkpoint_epoch_N.pth"):
        load_denoiser(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="pipeline folder '.*empty' has no model_index.json"):
        load_pipeline(tmp_path / "empty")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="out_dir '.*f' is a file"):
        export_pipeline(tmp_path / "none.pth", tmp_path / "f")


def test_pipeline_whose_config_does_not_fit_its_weights_is_one_error(model, cfg, tmp_path):
    import json

    pipe_for(model, cfg).save_pretrained(tmp_path / "pipe")
    conf = tmp_path / "pipe" / "unet" / "config.json"
    raw = json.loads(conf.read_text())
    raw["model_channels"] = 16  # hand-edited (or a misspelt key dropped): the weights no longer fit
    conf.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"the weights in unet/ do not fit its unet/config.json \(size mismatch for .*re-export it"):
        load_pipeline(tmp_path / "pipe")


def test_export_under_a_file_is_refused_before_loading(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"out_dir '.*f/pipe' lies under '.*f', which is a file"):
        export_pipeline(tmp_path / "none.pth", tmp_path / "f" / "pipe")
