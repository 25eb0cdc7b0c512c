"""moelab: one sparse Mixture-of-Experts core, two applications (MoEFsDiC diffusion, SeisMoE picking)."""

from moelab.errors import MoelabError

__version__ = "0.1.0"

__all__ = ["MoelabError", "__version__"]
