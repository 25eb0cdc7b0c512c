"""SeisMoE: exact parameter figures, upcycling from EQTransformer weights (all base_model forms),
SeisBench save/load and continuous picking, routing gradients, and refusal of pickled payloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("seisbench")
import seisbench  # noqa: E402
from seisbench.models import EQTransformer  # noqa: E402
from seisbench.models.base import CustomLSTM  # noqa: E402

from moelab.errors import CheckpointError, ConfigError  # noqa: E402
from moelab.moe import TokenMoE, freeze_non_moe, model_aux_loss  # noqa: E402
from moelab.seismic.model import SeisMoE  # noqa: E402
from moelab.seismic.weights import build_eqtransformer, load_base_weights  # noqa: E402

N = 600  # short windows keep the tests fast; parameter counts do not depend on the length


def _max_diff(a, b) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))


@pytest.fixture
def seisbench_cache(tmp_path, monkeypatch):
    """An empty SeisBench cache and an unreachable remote, so nothing leaves the machine."""
    root = tmp_path / "sbcache"
    monkeypatch.setattr(seisbench, "cache_root", root)
    monkeypatch.setattr(seisbench, "cache_model_root", root / "models" / "v3")
    monkeypatch.setattr(seisbench, "remote_model_root", "http://127.0.0.1:9/models/v3/")
    folder = root / "models" / "v3" / "eqtransformer"
    folder.mkdir(parents=True)
    return folder


def test_parameter_figures_of_the_user_guide():
    eqt = EQTransformer()
    moe = SeisMoE(num_experts=4, num_experts_per_token=2)
    n_eqt = sum(p.numel() for p in eqt.parameters())
    n_moe = sum(p.numel() for p in moe.parameters())
    assert (n_eqt, n_moe, n_moe - n_eqt) == (376_935, 402_511, 25_576)
    assert round(100 * (n_moe - n_eqt) / n_eqt, 1) == 6.8
    report = freeze_non_moe(moe)
    assert (report.total, report.trainable, report.tensors) == (402_511, 34_056, 36)
    assert round(report.percent, 1) == 8.5 and round(100 - report.percent, 1) == 91.5
    trainable = {n.split(".ff.")[1].split(".")[0] for n, p in moe.named_parameters() if p.requires_grad}
    assert trainable == {"router", "experts"}
    # both transformer FFNs are MoE layers with Linear(16, 4, bias) routers and FFN-shaped experts
    for block in (moe.transformer_d0, moe.transformer_d):
        assert isinstance(block.ff, TokenMoE)
        assert block.ff.router.net.weight.shape == (4, 16) and block.ff.router.net.bias is not None
        assert [tuple(p.shape) for p in block.ff.experts[0].parameters()] == [(128, 16), (128,), (16, 128), (16,)]


def test_outputs_match_eqtransformer_shapes_and_range():
    torch.manual_seed(0)
    x = torch.randn(2, 3, N)
    eqt, moe = EQTransformer(in_samples=N).eval(), SeisMoE(in_samples=N, num_experts=8, num_experts_per_token=3).eval()
    with torch.no_grad():
        ref, out = eqt(x), moe(x)
    assert len(out) == len(ref) == 3
    assert [o.shape for o in out] == [r.shape for r in ref] == [torch.Size([2, N])] * 3
    assert all(float(o.min()) >= 0.0 and float(o.max()) <= 1.0 for o in out)


def test_routing_is_per_token_and_loss_and_usage_are_tracked():
    torch.manual_seed(0)
    moe = SeisMoE(in_samples=N, num_experts=4, num_experts_per_token=2)
    x = torch.randn(2, 3, N)
    moe(x)
    t = moe.transformer_d0.ff.last_routing.logits.shape[0]
    assert t == 2 * 5  # one token per trace and position: 600 samples -> 5 positions after 7 poolings
    assert torch.allclose(moe.get_moe_loss(), model_aux_loss(moe))
    usage = moe.moe_usage()
    assert set(usage) == {"transformer_d0.ff", "transformer_d.ff"}
    assert all(u["total"] == t * 2 for u in usage.values())  # k=2 assignments per token
    moe.reset_moe_stats()
    assert all(u["total"] == 0 for u in moe.moe_usage().values())


def test_gradients_reach_only_the_selected_experts():
    torch.manual_seed(0)
    moe = SeisMoE(in_samples=N, num_experts=4, num_experts_per_token=2)
    for block in (moe.transformer_d0, moe.transformer_d):
        with torch.no_grad():  # every token prefers experts 1 and 3
            block.ff.router.net.weight.zero_()
            block.ff.router.net.bias.copy_(torch.tensor([0.0, 3.0, -1.0, 2.0]))
    det, p, s = moe(torch.randn(2, 3, N))
    (det.sum() + p.sum() + s.sum()).backward()
    for block in (moe.transformer_d0, moe.transformer_d):
        for e, expert in enumerate(block.ff.experts):
            grads = [q.grad for q in expert.parameters()]
            if e in (1, 3):
                assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
            else:
                assert all(g is None or float(g.abs().sum()) == 0 for g in grads)
        assert float(block.ff.router.net.weight.grad.abs().sum()) > 0  # through the combine weights


def test_load_loss_moves_only_the_routers():
    """With detached router inputs (default) the aux loss cannot reshape the trunk's features."""
    x = torch.randn(2, 3, N)
    for detach in (True, False):
        torch.manual_seed(0)
        moe = SeisMoE(in_samples=N, detach_router_input=detach)
        moe(x)
        moe.get_moe_loss().backward()
        others = [p.grad for n, p in moe.named_parameters() if ".ff.router." not in n]
        reached = any(g is not None and float(g.abs().sum()) > 0 for g in others)
        assert reached is (not detach)
        assert float(moe.transformer_d.ff.router.net.weight.grad.abs().sum()) > 0
    # the task loss still trains the trunk through the experts
    torch.manual_seed(0)
    moe = SeisMoE(in_samples=N)
    moe(x)[1].sum().backward()
    assert float(moe.bi_lstm_stack.members[0].conv.weight.grad.abs().sum()) > 0


def _assert_upcycled(dense: EQTransformer, moe: SeisMoE, n: int = N) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, n)
    dense.eval(), moe.eval()
    with torch.no_grad():
        assert _max_diff(dense(x), moe(x)) <= 1e-6


def test_upcycled_from_a_seisbench_folder_equals_the_dense_model(tmp_path):
    torch.manual_seed(0)
    dense = EQTransformer(in_samples=N, norm="peak")
    (tmp_path / "eqt").mkdir()
    dense.save(tmp_path / "eqt" / "mine")
    moe = SeisMoE.from_base(str(tmp_path / "eqt"), num_experts=4, num_experts_per_token=2)
    assert moe.norm == "peak" and moe.in_samples == N  # architecture arguments come from the json
    _assert_upcycled(dense, moe)
    for form in (tmp_path / "eqt" / "mine", tmp_path / "eqt" / "mine.json", tmp_path / "eqt" / "mine.pt"):
        _assert_upcycled(dense, SeisMoE.from_base(form, num_experts=3, num_experts_per_token=1))
    # the same weights as a plain dense baseline
    _assert_upcycled(dense, build_eqtransformer(tmp_path / "eqt"))


def test_upcycled_from_plain_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    dense = EQTransformer(in_samples=N)
    torch.save(dense.state_dict(), tmp_path / "plain.pt")
    save_file(dense.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "w.json").write_text(json.dumps({"model_args": {"in_samples": N}}))
    _assert_upcycled(dense, SeisMoE.from_base(tmp_path / "plain.pt", in_samples=N))
    _assert_upcycled(dense, SeisMoE.from_base(str(tmp_path / "w.safetensors")))


def test_upcycled_from_a_lightning_checkpoint_of_the_dense_baseline(tmp_path):
    from moelab.seismic.lit import EQTransformerLit

    torch.manual_seed(0)
    lit = EQTransformerLit(in_samples=N, norm="peak")
    hparams = {k: v for k, v in lit.hparams.items() if k not in ("in_samples", "norm")}  # only the resolved model_args
    ckpt = {"state_dict": lit.state_dict(), "hyper_parameters": hparams, "epoch": 3}
    torch.save(ckpt, tmp_path / "eqt.ckpt")
    moe = SeisMoE.from_base(tmp_path / "eqt.ckpt", num_experts=4, num_experts_per_token=2)
    assert moe.norm == "peak" and moe.in_samples == N  # architecture from the checkpoint's hyper-parameters
    _assert_upcycled(lit.model, moe)


def test_stead_and_original_names_resolve_through_seisbench_cache(seisbench_cache):
    torch.manual_seed(0)
    stead = EQTransformer(in_samples=N)
    stead.save(seisbench_cache / "stead", version_str="3")
    moe = SeisMoE.from_base("stead", num_experts=4, num_experts_per_token=2)
    _assert_upcycled(stead, moe)

    # "original": Mousavi et al.'s binary-compatible architecture (custom LSTMs, tf epsilons, 2 LSTM
    # blocks, peak norm), described by the model_args stored with the weights. Built with the
    # default architecture these weights do not load; SeisMoE reads the stored arguments.
    original = EQTransformer(original_compatible=True, lstm_blocks=2, norm="peak", in_samples=6000)
    original.save(seisbench_cache / "original", version_str="1")
    meta_path = seisbench_cache / "original.json.v1"
    meta = json.loads(meta_path.read_text())
    meta["model_args"]["original_compatible"] = True  # as in SeisBench's published json
    meta_path.write_text(json.dumps(meta))
    moe = SeisMoE.from_base("original", num_experts=4, num_experts_per_token=2)
    assert isinstance(moe.bi_lstm_stack.members[0].lstm, CustomLSTM) and moe.lstm_blocks == 2
    assert moe.transformer_d0.attention.eps == 1e-7
    _assert_upcycled(original, moe, n=6000)


def _serve_webdav(folder: Path):
    """A minimal WebDAV-like server (PROPFIND listing + GET) like SeisBench's weight repository."""
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(folder), **kw)

        def log_message(self, *a):  # keep the test output clean
            pass

        def do_PROPFIND(self):  # noqa: N802 - HTTP verb
            listed = folder / self.path.strip("/")
            hrefs = [self.path] + [self.path.rstrip("/") + "/" + f.name for f in sorted(listed.iterdir())]
            body = ('<?xml version="1.0"?><d:multistatus xmlns:d="DAV:">'
                    + "".join(f"<d:response><d:href>{h}</d:href></d:response>" for h in hrefs)
                    + "</d:multistatus>").encode()
            self.send_response(207)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_pretrained_name_is_downloaded_by_seisbench_when_online(seisbench_cache, tmp_path, monkeypatch):
    torch.manual_seed(0)
    remote = tmp_path / "remote" / "eqtransformer"
    remote.mkdir(parents=True)
    dense = EQTransformer(in_samples=N)
    dense.save(remote / "geofon", version_str="2")
    server = _serve_webdav(remote.parent)
    try:
        monkeypatch.setattr(seisbench, "remote_model_root", f"http://127.0.0.1:{server.server_port}/")
        moe = SeisMoE.from_base("geofon", num_experts=4, num_experts_per_token=2)
    finally:
        server.shutdown()
    assert (seisbench_cache / "geofon.pt.v2").is_file() and (seisbench_cache / "geofon.json.v2").is_file()
    _assert_upcycled(dense, moe)


def test_missing_pretrained_weights_offline_says_where_to_put_them(seisbench_cache):
    with pytest.raises(CheckpointError) as err:
        SeisMoE.from_base("stead")
    msg = str(err.value)
    assert str(seisbench_cache) in msg and "stead.pt" in msg and "base_model" in msg


def test_pretrained_cache_never_runs_pickled_code(seisbench_cache, monkeypatch):
    from moelab.seismic.weights import torch_load_refuses_pickles

    marker = seisbench_cache / "PWNED"
    torch.save({**EQTransformer(in_samples=N).state_dict(), "evil": _Payload(marker)}, seisbench_cache / "evil.pt.v1")
    EQTransformer(in_samples=N).save(seisbench_cache / "tmp")
    os.replace(seisbench_cache / "tmp.json", seisbench_cache / "evil.json.v1")
    (seisbench_cache / "tmp.pt").unlink()
    assert torch_load_refuses_pickles()  # torch >= 2.6: SeisBench's from_pretrained reads the cache itself
    with pytest.raises(CheckpointError, match="refused"):
        SeisMoE.from_base("evil")
    # a torch whose bare torch.load would unpickle: the cached pair is read by moelab's safe reader
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert not torch_load_refuses_pickles()
    with pytest.raises(CheckpointError, match="refused"):
        SeisMoE.from_base("evil")
    assert not marker.exists()
    torch.manual_seed(0)
    stead = EQTransformer(in_samples=N)
    stead.save(seisbench_cache / "stead", version_str="3")
    _assert_upcycled(stead, SeisMoE.from_base("stead", num_experts=4, num_experts_per_token=2))
    with pytest.raises(CheckpointError, match=r"not in SeisBench's cache.*upgrade torch to >= 2.6"):
        SeisMoE.from_base("ethz")  # not cached: no download with such a torch


def test_save_load_roundtrip_in_seisbench_format(tmp_path):
    torch.manual_seed(0)
    moe = SeisMoE(in_samples=N, num_experts=6, num_experts_per_token=2, gate="softmax_topk").eval()
    moe.save(tmp_path / "seismoe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seismoe.json", "seismoe.pt"]
    meta = json.loads((tmp_path / "seismoe.json").read_text())
    assert meta["model_args"]["num_experts"] == 6 and meta["model_args"]["num_experts_per_token"] == 2
    back = SeisMoE.load(tmp_path / "seismoe").eval()
    assert back.get_model_args() == moe.get_model_args()
    x = torch.randn(2, 3, N)
    with torch.no_grad():
        assert _max_diff(moe(x), back(x)) == 0.0
    # a trained SeisMoE is also a valid base_model (loaded as is, not upcycled)
    again = SeisMoE.from_base(tmp_path / "seismoe").eval()
    with torch.no_grad():
        assert _max_diff(moe(x), again(x)) == 0.0
    # a dense EQTransformer folder is not a SeisMoE: clear error with the fix
    EQTransformer(in_samples=N).save(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="from_base"):
        SeisMoE.load(tmp_path / "dense")


def test_get_model_args_round_trip():
    moe = SeisMoE(in_samples=N, num_experts=5, num_experts_per_token=3, router_jitter=0.1, aux_loss="variance")
    args = moe.get_model_args()
    for key, value in dict(num_experts=5, num_experts_per_token=3, router_jitter=0.1, aux_loss="variance", in_samples=N).items():
        assert args[key] == value
    assert SeisMoE(**args).get_model_args() == args


def test_annotate_and_classify_a_real_recording():
    obspy = pytest.importorskip("obspy")
    stream = obspy.read()  # BW.RJOB, real 3-component local earthquake, 100 Hz, 30 s
    torch.manual_seed(0)
    moe = SeisMoE(in_samples=1000)
    kwargs = dict(overlap=500, blinding=(100, 100))
    annotations = moe.annotate(stream, **kwargs)
    assert sorted(tr.stats.channel for tr in annotations) == ["SeisMoE_Detection", "SeisMoE_P", "SeisMoE_S"]
    data = np.stack([tr.data for tr in annotations])
    assert data.shape[1] > 2000 and np.nanmin(data) >= 0 and np.nanmax(data) <= 1
    out = moe.classify(stream, P_threshold=0.0, S_threshold=0.0, **kwargs)
    assert len(out.picks) >= 2 and {p.phase for p in out.picks} == {"P", "S"}
    assert all(p.trace_id.startswith("BW.RJOB") for p in out.picks)
    assert sum(u["total"] for u in moe.moe_usage().values()) > 0


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_loading_refuses_pickle_payloads(tmp_path):
    marker = tmp_path / "PWNED"
    state = EQTransformer(in_samples=N).state_dict()
    state["evil"] = _Payload(marker)
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        SeisMoE.from_base(tmp_path / "evil.pt")
    # the same payload inside a SeisBench-format pair, through SeisMoE.load and the dense builder
    torch.save({**SeisMoE(in_samples=N).state_dict(), "evil": _Payload(marker)}, tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(json.dumps({"model_args": {"in_samples": N, "num_experts": 4}}))
    with pytest.raises(CheckpointError, match="refused"):
        SeisMoE.load(tmp_path / "m")
    with pytest.raises(CheckpointError, match="refused"):
        build_eqtransformer(tmp_path / "evil.pt")
    assert not marker.exists()


def test_bad_arguments_and_files_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="num_experts"):
        SeisMoE(num_experts=0)
    with pytest.raises(ConfigError, match="num_experts_per_token"):
        SeisMoE(num_experts=4, num_experts_per_token=5)
    with pytest.raises(ConfigError, match="gate"):
        SeisMoE(gate="argmax")
    with pytest.raises(ConfigError, match="unknown SeisMoE argument 'not_an_argument'; valid keys: num_experts, .*in_samples"):
        SeisMoE(not_an_argument=1)
    with pytest.raises(ConfigError, match="unknown SeisMoE argument 'num_expertz'; did you mean 'num_experts'"):
        SeisMoE(num_expertz=4)  # e.g. a typo in an exported .json's model_args
    with pytest.raises(ConfigError, match="did you mean 'in_samples'"):
        SeisMoE(in_sample=3001)
    with pytest.raises(CheckpointError, match="does not exist"):
        SeisMoE.from_base(tmp_path / "nowhere.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"weights folder '.*empty' must hold exactly one set of weights, found none"):
        SeisMoE.from_base(tmp_path / "empty")  # the same loader serves base_model, pick and export
    (tmp_path / "a.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        SeisMoE.from_base(tmp_path / "a.pt")
    torch.save(EQTransformer(in_samples=N, lstm_blocks=2).state_dict(), tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        SeisMoE.from_base(tmp_path / "two.pt", in_samples=N)  # architecture args missing
    assert load_base_weights(None) is None and load_base_weights("none") is None
