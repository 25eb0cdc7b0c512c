"""Inception-v3 features for the standard FID, read from a local weights file (never downloaded).

The standard FID network is the TensorFlow 2015-12-05 Inception graph as torch-fidelity and
pytorch-fid port it; its weights file is torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (pytorch-fid ships the same tensors as
``pt_inception-2015-12-05-6726825d.pth``): a plain state dict. Both libraries would download it;
here it is always a local file, read with ``weights_only=True`` before anything else touches it.

Which network runs the features:

* torch-fidelity's ``FeatureExtractorInceptionV3`` through torchmetrics (``NoTrainInceptionV3``,
  TF1-style resize) whenever torch-fidelity can be imported (``pip install "moelab[fid]"`` with a
  torchvision that matches the installed torch);
* otherwise `FIDInceptionV3` below, the same graph with torch-fidelity's module names (so the
  same file loads key for key) and the same input path (uint8 RGB, TensorFlow-1 bilinear resize to
  299, ``(x - 128) / 128``). torch-fidelity imports torchvision when it is imported, and PyPI's
  torchvision is built against CUDA torch: beside the CPU-only torch build it cannot be loaded,
  and installing it breaks ``import torchmetrics`` / ``diffusers``. Only for that case is the
  network written out here; its features were checked against torch-fidelity's on the same
  weights (README, "Sampling, evaluation").

Either way the Fréchet distance itself is torchmetrics' ``FrechetInceptionDistance``.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import CheckpointError

#: Where the weights come from (torch-fidelity's release asset; pytorch-fid's file holds the same tensors).
INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
NUM_FEATURES = 2048


def _where_to_get() -> str:
    return f"download {INCEPTION_WEIGHTS_URL} on a machine with internet and pass the local file (it is never downloaded here)"


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw) -> None:  # noqa: ANN003
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for i in range(2, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool=False``: FID block Mixed_7b (average pool); ``True``: Mixed_7c (max pool)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """TensorFlow-1 ``resize_bilinear`` (align_corners=False, no half-pixel centres), as the FID graph resizes.

    Source pixel of output pixel i is ``i * in / out``; PyTorch's bilinear uses half-pixel centres
    and gives other values, which shifts FID.
    """

    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        pos = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.to(x.dtype)

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bottom = x[:, :, ylo, :], x[:, :, yhi, :]
    t0, t1, b0, b1 = top[..., xlo], top[..., xhi], bottom[..., xlo], bottom[..., xhi]
    dx = dx.view(1, 1, 1, -1)
    row0, row1 = t0 + (t1 - t0) * dx, b0 + (b1 - b0) * dx
    return row0 + (row1 - row0) * dy.view(1, 1, -1, 1)


class FIDInceptionV3(nn.Module):
    """uint8 RGB images ``[N, 3, H, W]`` (any size) -> 2048-d pool features of the FID graph.

    Used only where torch-fidelity cannot be imported (see the module docstring); module names and
    input path are torch-fidelity's, so its weights file loads strictly and features agree.
    """

    num_features = NUM_FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused for features; part of the published state dict
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        return super().train(False)  # batch-norm statistics are the published ones, always

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 expects uint8 [N, 3, H, W] images, got {x.dtype} {tuple(x.shape)}")
        x = resize_bilinear_tf1(x.float(), INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def torch_fidelity_available() -> bool:
    """True when torch-fidelity (and so the torchvision it imports) loads in this environment."""
    try:
        import torch_fidelity  # noqa: F401
    except Exception:  # ImportError, or torchvision's RuntimeError when it does not match torch
        return False
    return True


def read_inception_weights(path: str | Path) -> bytes:
    """The weights file's bytes, checked: loads with ``weights_only=True`` and fits the FID Inception-v3.

    Returned as bytes so that the library reads exactly the verified content (torch-fidelity
    itself would call ``torch.load(weights_only=False)`` on a path).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise CheckpointError(f"Inception weights '{path}' {what}: {_where_to_get()}")
    data = path.read_bytes()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Inception weights '{path}' were refused: not a plain tensor file ({str(e).splitlines()[0][:120]}); "
            f"{_where_to_get()}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"Inception weights '{path}' are corrupt or not a PyTorch file ({type(e).__name__}); {_where_to_get()}"
        ) from None
    with torch.device("meta"):  # shapes only: no 24M-parameter initialisation
        expected = FIDInceptionV3().state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"Inception weights '{path}' are not a state dict of tensors; {_where_to_get()}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        few = lambda ks: ", ".join(ks[:3]) + (" ..." if len(ks) > 3 else "")  # noqa: E731
        raise CheckpointError(
            f"Inception weights '{path}' do not fit the FID Inception-v3 (missing {len(missing)} keys: {few(missing)}; "
            f"unexpected {len(unexpected)}: {few(unexpected)}; {len(shapes)} shape mismatches: {few(shapes)}); "
            f"expected {INCEPTION_WEIGHTS_NAME}: {_where_to_get()}"
        )
    return data


class _LibraryInception(nn.Module):
    """torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's network), TF1 resize, 2048 features."""

    num_features = NUM_FEATURES

    def __init__(self, data: bytes) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=[str(NUM_FEATURES)],
            feature_extractor_weights_path=io.BytesIO(data),  # type: ignore[arg-type]  # verified bytes, see read_inception_weights
            antialias=False,
        )

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).reshape(x.shape[0], -1)


def load_inception(path: str | Path, backend: str = "auto") -> nn.Module:
    """Feature extractor (uint8 RGB ``[N, 3, H, W]`` -> ``[N, 2048]``) from a local weights file.

    Args:
        path: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (or pytorch-fid's
            ``pt_inception-2015-12-05-6726825d.pth``), a plain state dict.
        backend: ``"torch-fidelity"``, ``"builtin"`` (`FIDInceptionV3`) or ``"auto"`` (the
            library when it can be imported).
    """
    if backend not in ("auto", "torch-fidelity", "builtin"):
        raise CheckpointError(f"Inception backend {backend!r} is unknown; use auto, torch-fidelity or builtin")
    data = read_inception_weights(path)
    if backend == "torch-fidelity" or (backend == "auto" and torch_fidelity_available()):
        if not torch_fidelity_available():
            raise CheckpointError(
                "the torch-fidelity Inception backend was requested but torch-fidelity cannot be imported: "
                'pip install "moelab[fid]" with a torchvision that matches your torch'
            )
        return _LibraryInception(data).eval()
    with torch.device("meta"):
        model = FIDInceptionV3()
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), assign=True)
    return model.eval()


def to_uint8_rgb(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 ``[N, 3, H, W]`` as they would be saved to PNG (grey repeated to RGB)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
