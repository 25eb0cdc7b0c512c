"""The MoE core and both applications under DistributedDataParallel: 2 gloo processes on CPU.

* usage counts are each rank's own truth (DDP broadcasts buffers from rank 0; the counts are not
  buffers) and the logged/monitored figures are their sum over ranks;
* an expert that gets no unit on one rank does not stop training (every expert parameter takes
  part in every backward, with DDP's default ``find_unused_parameters=False``), and the weights
  stay identical across ranks after every step, for a token MoE, MoEFsDiC and SeisMoE;
* recycling SeisMoE's dormant decoder channels on rank-specific batches judges the activity summed
  over ranks and leaves the weights identical across ranks;
* Lightning DDP training of MoEFsDiC resumed from a checkpoint equals an uninterrupted run.

Workers are started with torch.multiprocessing (spawn) and set up their process group themselves;
the Lightning runs inside them see an externally launched 2-process job (LOCAL_RANK, WORLD_SIZE).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def _assert_same_weights(model: nn.Module, what: str) -> None:
    for name, p in model.named_parameters():
        a, b = _gather(p.detach())
        assert torch.equal(a, b), f"{what}: {name} differs across ranks"


def _train_and_check(model: nn.Module, batches, loss_fn, what: str, lr: float = 1e-2) -> None:
    """DDP with the defaults (find_unused_parameters=False, broadcast_buffers=True); rank-own counts checked."""
    from moelab.moe import moe_layers

    ddp = DDP(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    layers = moe_layers(model)
    for step, batch in enumerate(batches):
        before = [m.usage.counts.clone() for m in layers]
        loss = loss_fn(ddp, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for m, c0 in zip(layers, before, strict=True):  # this rank's counts grew by exactly this rank's routing
            own = torch.bincount(m.last_routing.indices.reshape(-1), minlength=m.num_experts)
            assert torch.equal(m.usage.counts - c0, own), f"{what}: counts are not this rank's routing at step {step}"
        _assert_same_weights(model, f"{what}, step {step}")


# ------------------------------------------------------------------------------ core + both apps
def _worker(rank: int, port: int, folder: str) -> None:
    _setup(rank, port)
    from moelab.moe import TokenMoE, moe_usage
    from moelab.moe.callbacks import ExpertUsageMonitor

    # 1. token MoE, k = 1: rank 0 routes to experts 0-2 only, rank 1 to expert 3 only (idle experts on both ranks)
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6))
    model = nn.Sequential(nn.Identity(), TokenMoE.upcycle(ffn, num_experts=4, k=1, router_in_features=6))
    moe = model[1]
    with torch.no_grad():
        moe.router.net.weight.zero_()
        moe.router.net.weight[:4, :4] = 50 * torch.eye(4)
        moe.router.net.bias.zero_()
    g = torch.Generator().manual_seed(100 + rank)

    def batch():
        experts = torch.randint(0, 3, (5, 4), generator=g) if rank == 0 else torch.full((5, 4), 3)
        x = torch.randn(5, 4, 6, generator=g)
        x[..., :4] = nn.functional.one_hot(experts, 6)[..., :4].float() * 5.0
        return x

    def loss_fn(ddp, x):
        return ddp(x).pow(2).mean()

    batches = [batch() for _ in range(4)]
    monitor = ExpertUsageMonitor(interval=1, max_share=0.99, patience=10)
    _train_and_check(model, batches, loss_fn, "token MoE", lr=1e-3)
    local = moe.usage.counts.clone()
    assert (local[3] == 0) if rank == 0 else bool((local[:3] == 0).all()), f"rank {rank} routing {local.tolist()}"
    total = sum(_gather(local))
    assert moe_usage(model, across_ranks=True)["1"]["counts"] == total.tolist()  # what is logged
    assert moe_usage(model)["1"]["counts"] == local.tolist()
    shares = monitor.check(model)  # what the collapse monitor judges
    assert shares["moe/1/max_share"] == pytest.approx(float(total.max()) / float(total.sum()))

    # 2. MoEFsDiC tiny (gathered conv experts, per-sample routing), rank-specific images and classes
    from moelab import MoEFsDiC_UNet, MoELoss

    cfg = {"model": {"model_channels": 8, "channel_mults": [1, 2], "image_size": 16, "in_channels": 1, "num_classes": 4},
           "moe": {"num_experts": 4, "k_active": 1, "router_hidden": 8}}
    torch.manual_seed(0)
    unet = MoEFsDiC_UNet(cfg)
    crit = MoELoss(lambda_load=0.01)
    gi = torch.Generator().manual_seed(200 + rank)
    imgs = [(torch.randn(3, 1, 16, 16, generator=gi) + 3 * rank, torch.randint(0, 1000, (3,), generator=gi),
             torch.full((3,), rank)) for _ in range(3)]

    def unet_loss(ddp, b):
        x, t, c = b
        pred, logits = ddp(x, t, c)
        return crit(pred, x, logits)[0]

    _train_and_check(unet, imgs, unet_loss, "MoEFsDiC")

    # 3. SeisMoE tiny (token MoE in EQTransformer's transformer FFNs), k = 1
    from moelab.seismic.model import SeisMoE

    torch.manual_seed(0)
    seis = SeisMoE(num_experts=4, num_experts_per_token=1, in_samples=400)
    gs = torch.Generator().manual_seed(300 + rank)
    traces = [torch.randn(2, 3, 400, generator=gs) * (1 + 4 * rank) for _ in range(3)]

    def seis_loss(ddp, x):
        det, p, s = ddp(x)
        return det.mean() + p.mean() + s.mean() + 0.01 * seis.get_moe_loss()

    _train_and_check(seis, traces, seis_loss, "SeisMoE")

    # 4. recycling dormant decoder channels on rank-specific batches: every rank judges the activity
    #    summed over ranks and draws the same fresh weights, so the weights stay identical
    from moelab.seismic.dormant import channel_activity, recycle_dormant

    def all_reduce(t):
        dist.all_reduce(t)
        return t

    dec = seis.pick_decoders[0].convs[-1]
    with torch.no_grad():  # channel 2 of the P head's last decoder layer never fires, on any rank
        dec.weight[2] = 0.0
        dec.bias[2] = -1.0
    x = traces[0]  # differs by rank
    local = channel_activity(seis, x)
    summed = channel_activity(seis, x, all_reduce=all_reduce)
    for key, mine in local.items():
        torch.testing.assert_close(summed[key], sum(_gather(mine)), rtol=1e-6, atol=0)
    counts = recycle_dormant(seis, x, tau=0.025, generator=torch.Generator().manual_seed(5), all_reduce=all_reduce)
    assert counts["P"] >= 1
    c = torch.tensor([counts[h] for h in ("detection", "P", "S")])
    assert torch.equal(*_gather(c)), "ranks recycled different channels"
    _assert_same_weights(seis, "after recycling")
    _resume(rank, folder)
    dist.destroy_process_group()


def test_ddp_counts_usage_idle_experts_identical_weights_and_exact_resume(tmp_path):
    """One 2-process job for all DDP checks (starting workers is the expensive part)."""
    pytest.importorskip("seisbench")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)


# ------------------------------------------------------------------------ Lightning DDP resume
def _resume(rank: int, folder: str) -> None:
    """MoEFsDiC trained by Lightning with strategy="ddp" on the 2 workers: 2 epochs == 1 + resumed 1."""
    from pathlib import Path

    from moelab.checkpoint import safe_load
    from moelab.diffusion.training import fit

    cfg = {"model": {"in_channels": 1, "model_channels": 8, "channel_mults": [1], "image_size": 16},
           "moe": {"num_experts": 4, "k_active": 1, "router_hidden": 8},
           "train": {"batch_size": 8, "lr": 2e-3, "epochs": 2, "log_every": 1, "monitor_interval": 1, "ema": False},
           "data": {"dataset": "digits", "fit": "pad", "subset": 32}}
    out = Path(folder)
    kw = dict(accelerator="cpu", devices=WORLD, progress=False)
    full = fit(cfg, checkpoint_dir=out / "full", max_epochs=2, **kw)
    first = fit(cfg, checkpoint_dir=out / "part", max_epochs=1, **kw)
    resumed = fit(cfg, checkpoint_dir=out / "part", max_epochs=2, resume=first, **kw)
    if rank == 0:
        a, b, e1 = safe_load(full), safe_load(resumed), safe_load(first)
        assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (1, 4)  # 32 / 2 ranks / 8 per batch x 2
        diff = max(float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"])
        moved = max(float((a["state_dict"][k] - e1["state_dict"][k]).abs().max()) for k in a["state_dict"])
        assert diff <= 1e-6 and moved > 1e-4, (diff, moved)


# ----------------------------------------------------------------------------- epoch sampling
def test_epoch_sampler_shards_one_permutation_and_is_a_function_of_seed_and_epoch(monkeypatch):
    """Ranks take disjoint, equally long shares of one (seed, epoch) permutation; one process gets all of it."""
    import numpy as np

    from moelab import seeding

    single = seeding.EpochSampler(10, seed=3)
    single.set_epoch(2)
    order = list(single)
    assert sorted(order) == list(range(10)) and order == list(single)  # a permutation, the same when re-iterated
    assert order == np.random.default_rng(seeding.derive_seed(3, 2, seeding.ORDER_STREAM)).permutation(10).tolist()
    single.set_epoch(3)
    assert list(single) != order
    shares = []
    for rank in range(3):
        monkeypatch.setattr(seeding, "world", lambda rank=rank: (rank, 3))
        s = seeding.EpochSampler(10, seed=3)
        s.set_epoch(2)
        shares.append(list(s))
        assert len(s) == 4
    assert [i for tup in zip(*shares, strict=True) for i in tup] == order + order[:2]  # strided shards of the same order, padded
    assert seeding.derive_seed(3, 2, 0, 0) == seeding.derive_seed(3, 2, 0) != seeding.derive_seed(3, 2, 0, 1)


def test_epoch_sampler_resumes_inside_an_epoch_once():
    """`resume_at(epoch, n)`: that epoch's next iteration leaves out its first n indices; later
    iterations and other epochs are whole (a run stopped mid-epoch sees each sample once)."""
    from moelab import seeding

    s = seeding.EpochSampler(10, seed=3)
    s.set_epoch(2)
    whole = list(s)
    s.set_epoch(1)
    s.resume_at(2, 4)
    assert len(list(s)) == 10  # another epoch: untouched, the resume still pending
    s.set_epoch(2)
    assert list(s) == whole[4:]
    assert list(s) == whole
