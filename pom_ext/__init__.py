"""pom_ext: the Polynomial Mixer (PoM), a linear-time drop-in replacement for self-attention.

ops (pom_ext.ops, compiled kernels) -> functional (pom_ext.functional) -> layers (PoM, PoMRoPE, PoMState).
"""
from . import functional, ops, reference
from .layers import PoM, PoMState
from .ops import cpu_isa, native_available
from .rope import PoMRoPE

__all__ = ["PoM", "PoMRoPE", "PoMState", "functional", "ops", "reference", "native_available", "cpu_isa"]
__version__ = "0.1.0"
