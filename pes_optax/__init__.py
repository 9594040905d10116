"""pes_optax: unbiased gradient estimators for unrolled computation graphs.

Persistent Evolution Strategies and its family, with truncated backprop and
online references, as optax gradient transformations.
"""

from pes_optax._src.driver import Driver as Driver
from pes_optax._src.es import ESState as ESState
from pes_optax._src.es import full_es as full_es
from pes_optax._src.es import nres as nres
from pes_optax._src.es import pes as pes
from pes_optax._src.estimate import NONFINITE_POLICIES as NONFINITE_POLICIES
from pes_optax._src.estimate import ESDiagnostics as ESDiagnostics
from pes_optax._src.metrics import find_diagnostics as find_diagnostics
from pes_optax._src.pes_a import PESAState as PESAState
from pes_optax._src.pes_a import pes_a as pes_a
from pes_optax._src.problem import UnrolledProblem as UnrolledProblem
from pes_optax._src.problem import unroll as unroll
from pes_optax._src.truncated_es import truncated_es as truncated_es

__version__ = "0.1.0"

__all__ = (
    "Driver",
    "ESDiagnostics",
    "ESState",
    "NONFINITE_POLICIES",
    "PESAState",
    "UnrolledProblem",
    "full_es",
    "find_diagnostics",
    "nres",
    "pes",
    "pes_a",
    "truncated_es",
    "unroll",
)
