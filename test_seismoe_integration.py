"""SeisMoE integration check (the user guide's five checks): ``python test_seismoe_integration.py``.

Prints one ✅/❌ line per check and exits non-zero if any fails. Works offline: a config whose
``base_model`` names pretrained weights that are not in SeisBench's cache is built with random
initialisation instead, and the output says so (its model arguments are still all checked).
"""

from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIG_DIR = ROOT / "configs" / "seismic"
SAMPLES = 6000


class CheckFailed(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_shapes_and_parameters() -> str:
    import torch
    from seisbench.models import EQTransformer

    from moelab.seismic.model import SeisMoE

    torch.manual_seed(0)
    eqt, moe = EQTransformer().eval(), SeisMoE(num_experts=4, num_experts_per_token=2).eval()
    x = torch.randn(2, 3, SAMPLES)
    with torch.no_grad():
        ref, out = eqt(x), moe(x)
    expect([o.shape for o in out] == [r.shape for r in ref], f"output shapes {[tuple(o.shape) for o in out]} != EQTransformer's {[tuple(r.shape) for r in ref]}")
    lo, hi = min(float(o.min()) for o in out), max(float(o.max()) for o in out)
    expect(0.0 <= lo and hi <= 1.0, f"outputs outside [0, 1]: [{lo}, {hi}]")
    a, b = n_params(eqt), n_params(moe)
    expect((a, b, b - a) == (376_935, 402_511, 25_576), f"parameters EQT {a:,}, SeisMoE {b:,} (+{b - a:,}); expected 376,935 / 402,511 / +25,576")
    return (f"outputs {[tuple(o.shape) for o in out]} as EQTransformer, range [{lo:.3f}, {hi:.3f}] within [0, 1]; "
            f"parameters {b:,} vs {a:,} (+{b - a:,}, +{100 * (b - a) / a:.1f}%)")


def check_routing_loss_and_usage() -> str:
    import torch

    from moelab.moe import aux_loss, router_logits
    from moelab.seismic.model import SeisMoE

    torch.manual_seed(0)
    moe = SeisMoE(num_experts=4, num_experts_per_token=2)
    moe.reset_moe_stats()
    x = torch.randn(2, 3, SAMPLES)
    det, p, s = moe(x)
    logits = router_logits(moe)
    expect(len(logits) == 2, f"expected 2 MoE layers to route, got {len(logits)}")
    tokens = logits[0].shape[0]
    expect(tokens == 2 * 47, f"expected one routing decision per trace position (2 x 47), got {tokens}")
    loss = moe.get_moe_loss()
    expect(bool(torch.isfinite(loss)), f"load-balance loss is not finite: {loss}")
    expect(torch.allclose(loss, aux_loss(logits, 2)), "get_moe_loss() differs from the core load loss of the router logits")
    usage = moe.moe_usage()
    expect(all(u["total"] == 2 * tokens for u in usage.values()), f"usage counts {[u['counts'] for u in usage.values()]} do not sum to k x tokens")
    (det.mean() + p.mean() + s.mean() + 0.01 * loss).backward()
    router_grad = moe.transformer_d0.ff.router.net.weight.grad
    expect(router_grad is not None and float(router_grad.abs().sum()) > 0, "no gradient reaches the router")
    moe.reset_moe_stats()
    expect(all(u["total"] == 0 for u in moe.moe_usage().values()), "reset_moe_stats() did not clear the counts")
    shares = ", ".join(f"{name}: {u['counts']}" for name, u in usage.items())
    return f"{tokens} tokens routed top-2 of 4 in both layers, load loss {float(loss.detach()):.4f}, usage {shares}, reset clears"


def _base_model_offline(base_model):
    """``base_model`` if it resolves without the network, else None (and a note for the output)."""
    from moelab.seismic.weights import available_offline

    if available_offline(base_model):
        return base_model, ""
    return None, f"base_model {base_model!r} not in SeisBench's cache (offline): random initialisation"


def check_lightning_module() -> str:
    import torch

    from moelab.seismic.lit import SeisMoELit

    base, note = _base_model_offline("stead")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SeisMoELit(base_model=base, num_experts=8, num_experts_per_token=3, moe_loss_coef=0.015, freeze_non_moe=True)
    x = torch.randn(2, 3, SAMPLES)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        model.to(device).eval()
        with torch.no_grad():
            out = model(x.to(device))
        expect(len(out) == 3 and all(o.shape == (2, SAMPLES) for o in out), f"forward on {device} gave {[tuple(o.shape) for o in out]}")
        moe_loss = model.model.get_moe_loss()
        expect(bool(torch.isfinite(moe_loss)), f"model.model.get_moe_loss() not finite on {device}")
        model.model.reset_moe_stats()
    gpu = "GPU forward ok" if len(devices) > 1 else "no GPU here (CPU only)"
    return f"SeisMoELit(E=8, k=3, coef 0.015, frozen) forward ok, moe loss {float(moe_loss):.4f}; {gpu}" + (f"; {note}" if note else "")


def check_freezing() -> str:
    from moelab.seismic.lit import SeisMoELit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SeisMoELit(base_model=None, num_experts=4, num_experts_per_token=2, freeze_non_moe=True)
    r = model.trainable_report()
    expect((r.total, r.trainable, r.tensors) == (402_511, 34_056, 36), f"{r}; expected 34,056 / 402,511 in 36 tensors")
    names = {n for n, p in model.model.named_parameters() if p.requires_grad}
    expect(all(".ff.router." in n or ".ff.experts." in n for n in names), "a non-MoE parameter is trainable")
    return str(r)


def check_configs() -> str:
    from moelab.seismic.config import load_config
    from moelab.seismic.lit import EQTransformerLit, SeisMoELit

    files = sorted(CONFIG_DIR.glob("*.json"))
    expect(bool(files), f"no config files in {CONFIG_DIR} (expected stead_seismoe.json, ethz_seismoe.json, ...)")
    lines = []
    for path in files:
        cfg = load_config(path)
        args = dict(cfg.model_args)
        base, note = _base_model_offline(args.get("base_model"))
        args["base_model"] = base
        cls = SeisMoELit if cfg.model == "SeisMoE" else EQTransformerLit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = cls(**args)
        module.eval()
        import torch

        n = module.model.in_samples
        with torch.no_grad():
            out = module(torch.randn(1, 3, n))
        expect(all(o.shape == (1, n) for o in out), f"{path.name}: forward gave {[tuple(o.shape) for o in out]}")
        r = module.trainable_report() if hasattr(module, "trainable_report") else None
        desc = f"{path.name}: {cls.__name__}, {n_params(module.model):,} parameters"
        if r is not None:
            desc += f", {r.trainable:,} trainable"
        lines.append(desc + (f" [{note}]" if note else ""))
    return f"{len(files)} configs build their models:\n     " + "\n     ".join(lines)


CHECKS = [
    ("1. basic function (shapes, [0, 1], +6.8% parameters)", check_shapes_and_parameters),
    ("2. MoE routing, load-balance loss, usage statistics", check_routing_loss_and_usage),
    ("3. Lightning integration (SeisMoELit)", check_lightning_module),
    ("4. parameter freezing (91.5% frozen, 36 trainable tensors)", check_freezing),
    ("5. config files build their models", check_configs),
]


def main() -> int:
    failed = 0
    for title, fn in CHECKS:
        try:
            detail = fn()
            print(f"✅ {title}: {detail}", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
            failed += 1
            kind = "" if isinstance(e, CheckFailed) else f"{type(e).__name__}: "
            print(f"❌ {title}: {kind}{e}", flush=True)
            if not isinstance(e, CheckFailed) and "-v" in sys.argv:
                traceback.print_exc()
    print(f"{len(CHECKS) - failed}/{len(CHECKS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
