"""Sampling: solvers on the training betas, seeded determinism, guidance arithmetic, grids, CLI errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from moelab.cli import main
from moelab.diffusion.config import load_config
from moelab.diffusion.noise import training_scheduler
from moelab.diffusion.sample import (
    canonical_sampler,
    grid_labels,
    guided_eps,
    make_scheduler,
    parse_classes,
    sample,
    save_grid,
    save_npz,
)
from moelab.errors import ConfigError




class StandIn(nn.Module):
    """Tiny class-conditional eps model with MoEFsDiC's call signature; records the labels it sees."""

    def __init__(self, num_classes: int = 10, channels: int = 1, image_size: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.num_classes, self.in_channels, self.image_size = num_classes, channels, image_size  # what `generate` reads
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Embedding(num_classes + 1, channels)
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, c):
        self.seen.append(c.clone())
        scale = (t.float() / 1000.0).view(-1, 1, 1, 1)
        return torch.tanh(self.conv(x)) * scale + self.emb(c)[..., None, None], []


@pytest.fixture(scope="module")
def cfg():
    return load_config({"extends": "digits.yaml", "model": {"image_size": 8, "channel_mults": [1]}})


@pytest.mark.parametrize("spec,expected", [("0-9", list(range(10))), ("1,3,5", [1, 3, 5]), ("0-2,7", [0, 1, 2, 7]), ("all", list(range(10))), ("3", [3])])
def test_parse_classes(spec, expected):
    assert parse_classes(spec, 10) == expected


@pytest.mark.parametrize("spec", ["0-10", "a-b", "5-2", "", "-1", "1,,2"])
def test_parse_classes_rejects_bad_specs(spec):
    with pytest.raises(ConfigError, match="classes='"):
        parse_classes(spec, 10)


def test_unknown_sampler_is_a_config_error():
    assert canonical_sampler("DPMPP") == "dpm++"
    with pytest.raises(ConfigError, match="unknown sampler 'euler'"):
        canonical_sampler("euler")


@pytest.mark.parametrize("name,steps", [("ddpm", 1000), ("ddim", 50), ("dpm++", 20), ("dpm++", 10), ("dpm++sde", 20)])
def test_schedulers_use_training_betas(cfg, name, steps):
    s = make_scheduler(cfg, name, steps)
    assert torch.allclose(s.betas.double(), training_scheduler(cfg).betas.double())
    assert len(s.timesteps) == steps
    assert int(s.timesteps.max()) < 1000
    with pytest.raises(ConfigError, match="steps="):
        make_scheduler(cfg, name, 0)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++", "dpm++sde"])
def test_sampling_is_deterministic_under_a_seed(cfg, name):
    model = StandIn()
    labels = grid_labels([0, 1, 2], 2)
    a = sample(model, cfg, labels, sampler=name, steps=8, guidance=2.0, seed=3)
    b = sample(model, cfg, labels, sampler=name, steps=8, guidance=2.0, seed=3)
    c = sample(model, cfg, labels, sampler=name, steps=8, guidance=2.0, seed=4)
    assert a.shape == (6, 1, 8, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_guidance_one_equals_unguided_reference_loop(cfg):
    """w=1 must be plain conditional sampling: compare with a hand-written diffusers loop."""
    model = StandIn()
    labels = torch.tensor([0, 4, 9])
    got = sample(model, cfg, labels, sampler="ddpm", steps=25, guidance=1.0, seed=7)
    assert all(int(c.max()) < 10 for c in model.seen), "guidance 1 must not run the null class"

    gen = torch.Generator().manual_seed(7)  # initial noise first, then the solver's noise, one generator
    noise = torch.randn((3, 1, 8, 8), generator=gen)
    sched = make_scheduler(cfg, "ddpm", 25)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model(x, torch.full((3,), int(t)), labels)[0]
            x = sched.step(eps, t, x, generator=gen).prev_sample
    assert torch.equal(got, x.clamp(-1, 1))


def test_guided_eps_formula(cfg):
    model = StandIn()
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([10, 200, 500, 999])
    y = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        cond = model(x, t, y)[0]
        uncond = model(x, t, torch.full_like(y, 10))[0]
        got = guided_eps(model, x, t, y, 3.0, 10)
    assert torch.allclose(got, uncond + 3.0 * (cond - uncond), atol=1e-6)
    assert not torch.allclose(got, cond)


def test_sample_rejects_bad_labels_and_guidance(cfg):
    with pytest.raises(ConfigError):
        sample(StandIn(), cfg, [10], steps=2)
    with pytest.raises(ConfigError, match="guidance"):
        sample(StandIn(), cfg, [1], steps=2, guidance=-1)


def test_grid_and_npz_are_written_and_reloadable(tmp_path):
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    labels = grid_labels([3, 7], 3)
    p = save_grid(images, labels, tmp_path / "g.png", cell=32, pad=2)
    im = Image.open(p)
    assert im.size[1] == 2 * (32 + 2) + 2  # two rows of 32-pixel cells
    arr = np.asarray(im.convert("L"))
    # the first image's top-left pixel lands where the layout puts it, upscaled 4x (nearest)
    first = ((images[0, 0] + 1) * 127.5).round().numpy().astype(np.uint8)
    x0 = im.size[0] - 3 * (32 + 2)
    assert np.array_equal(arr[2:34:4, x0:x0 + 32:4], first)
    z = np.load(save_npz(images, labels, tmp_path / "s.npz"))
    assert z["images"].shape == (6, 8, 8, 1) and z["images"].dtype == np.uint8
    assert z["labels"].tolist() == labels.tolist()


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["diffusion", "sample", "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["diffusion", "sample", "--checkpoint", str(tmp_path / "missing.pth"), "--sampler", "euler"]) == 2
    assert "unknown sampler" in capsys.readouterr().err


def test_cli_refuses_unwritable_outputs_before_sampling(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    cases = [
        (["--out", str(tmp_path)], "is a folder: give the path of a file"),
        (["--out", str(tmp_path / "grid.xyz")], "has no image file extension Pillow can write ('.xyz'); end it in .png"),
        (["--out", str(tmp_path / "f" / "grid.png")], "which is a file, not a folder"),
        (["--out", str(tmp_path / "g.png"), "--npz", str(tmp_path)], "--npz '"),
    ]
    for flags, message in cases:  # the checkpoint is never read: the paths are checked first
        assert main(["diffusion", "sample", "--checkpoint", str(tmp_path / "missing.pth"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (flags, err)


def test_save_npz_returns_the_file_numpy_writes(tmp_path):
    path = save_npz(torch.zeros(1, 1, 8, 8), [0], tmp_path / "samples")
    assert path == tmp_path / "samples.npz" and path.is_file()
