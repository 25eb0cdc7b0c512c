"""Does SeisMoE earn its experts? The user guide's upcycle-and-fine-tune workflow over seeds and domains.

EQTransformer trained on generated domain A (stead_like) is the "pretrained" base; on domain B
(ethz_like) EQTransformer is fine-tuned (fully, and with only its two transformer FFNs training:
``eqt_ffn``, the dense control of the guide's frozen recipe), SeisMoE is upcycled from the base and fine-tuned with
``freeze_non_moe`` (the guide's recipe) or fully, and SeisMoE is trained from scratch; every model
is scored on pick-benchmark's tasks 1/2/3 (thresholds from dev) in-domain and on A and C
(geofon_like). After each training, every model picks ObsPy's real test event at its dev-tuned
thresholds (what ``moelab seismic pick`` prints for the exported model), tabled per seed with a
``real_event: ...`` line of how many seeds put both P and S within 0.3 s of the reference. The
work is done by `moelab.seismic.quality` through the benchmark harness; this script (like
``moelab seismic quality``) only parses the size flags. Prints mean ± std tables and ends with

``seismoe_quality: mcc moe-eqt=<±x.xxx> p_mae moe/eqt=<x.xx> s_mae moe/eqt=<x.xx> det_auc moe-eqt=<±x.xxx>``

Usage: ``python bench/seismoe_quality.py [--seeds 0 1 2] [--traces 1200] [--base-epochs 20] [--ft-epochs 8] [--out DIR]``
(trained models and data are reused when the folder already holds them with the same config).
Levers: ``--moe-args '{"num_experts": 4, "num_experts_per_token": 2, "moe_loss_coef": 0.02, "shared_expert": true}'
--tag _shared --variants eqt_ft moe_frozen moe_full`` runs them beside the default in the same folder
(``quality_shared.md``), reusing its data, base and dense (``eqt_ft``, ``eqt_ffn``) models.
Domains: ``--domains stead_like_weak_p ethz_like geofon_like`` pretrains the base on traces whose P
wave trains are 1/8-1x their recorded amplitude (`moelab.seismic.synth.Domain.p_gain`), the
setting under which the fine-tuned models pick the S of ObsPy's real event (README);
``--domains stead_like_weak_p ethz_like_local geofon_like`` fine-tunes on ETHZ-like data with
near-source events and weaker P trains, the traits of that event; ``ethz_like_dense`` adds that
near-source events are recorded far above the noise, as that event is, and ``ethz_like_dense_hf``
that they also keep their high frequencies; ``stead_like_weak_p_hf`` as A gives the base those
high-frequency near-source P too. ``bench/real_event_probe.py`` then shows what each trained
model's picks on the event depend on.
"""

from __future__ import annotations

import argparse

from moelab.guard import run_guarded
from moelab.seismic.quality import add_args, main_from_args


def main() -> int:
    parser = add_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args()
    return run_guarded(lambda: main_from_args(args))


if __name__ == "__main__":
    raise SystemExit(main())
