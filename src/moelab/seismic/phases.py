"""Phase definitions: which SeisBench metadata columns hold P and which hold S onsets.

One home for pick-benchmark's phase dictionary, read by the Lightning modules (labels) and the
evaluation (targets, residuals).
"""

from __future__ import annotations

#: Metadata columns labelled as P or S (pick-benchmark's phase dictionary, SeisBench column names).
PHASE_DICT: dict[str, str] = {
    "trace_p_arrival_sample": "P",
    "trace_pP_arrival_sample": "P",
    "trace_P_arrival_sample": "P",
    "trace_P1_arrival_sample": "P",
    "trace_Pg_arrival_sample": "P",
    "trace_Pn_arrival_sample": "P",
    "trace_PmP_arrival_sample": "P",
    "trace_pwP_arrival_sample": "P",
    "trace_pwPm_arrival_sample": "P",
    "trace_s_arrival_sample": "S",
    "trace_S_arrival_sample": "S",
    "trace_S1_arrival_sample": "S",
    "trace_Sg_arrival_sample": "S",
    "trace_SmS_arrival_sample": "S",
    "trace_Sn_arrival_sample": "S",
}
P_PHASES = [k for k, v in PHASE_DICT.items() if v == "P"]
S_PHASES = [k for k, v in PHASE_DICT.items() if v == "S"]
