"""SeisMoE: SeisBench's EQTransformer with sparse-MoE feed-forward layers, and its benchmark tooling.

Heavy imports (SeisBench, Lightning) happen in the submodules: ``from moelab.seismic.model import
SeisMoE``, ``from moelab.seismic.lit import SeisMoELit, EQTransformerLit``.
"""
