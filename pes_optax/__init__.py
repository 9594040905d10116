"""pes_optax: unbiased gradient estimators for unrolled computation graphs.

Persistent Evolution Strategies and its family, with truncated backprop and
online references, as optax gradient transformations.
"""

from pes_optax._src.adapters_frameworks import (
    from_flax_linen_rnn as from_flax_linen_rnn,
)
from pes_optax._src.adapters_frameworks import from_flax_nnx as from_flax_nnx
from pes_optax._src.adapters_frameworks import from_haiku as from_haiku
from pes_optax._src.adapters_inner import InnerTrainingState as InnerTrainingState
from pes_optax._src.adapters_inner import (
    default_hyperparams_transform as default_hyperparams_transform,
)
from pes_optax._src.adapters_inner import (
    inner_training_problem as inner_training_problem,
)
from pes_optax._src.adapters_rnn import RecurrentState as RecurrentState
from pes_optax._src.adapters_rnn import recurrent_problem as recurrent_problem
from pes_optax._src.backprop import BPTTState as BPTTState
from pes_optax._src.backprop import GradientDiagnostics as GradientDiagnostics
from pes_optax._src.backprop import TBPTTState as TBPTTState
from pes_optax._src.backprop import bptt as bptt
from pes_optax._src.backprop import tbptt as tbptt
from pes_optax._src.driver import Driver as Driver
from pes_optax._src.es import ESState as ESState
from pes_optax._src.estimate import NONFINITE_POLICIES as NONFINITE_POLICIES
from pes_optax._src.estimate import ESDiagnostics as ESDiagnostics
from pes_optax._src.metrics import find_diagnostics as find_diagnostics
from pes_optax._src.online import RTRLState as RTRLState
from pes_optax._src.online import rtrl as rtrl
from pes_optax._src.pes import full_es as full_es
from pes_optax._src.pes import nres as nres
from pes_optax._src.pes import pes as pes
from pes_optax._src.pes_a import PESAState as PESAState
from pes_optax._src.pes_a import pes_a as pes_a
from pes_optax._src.problem import UnrolledProblem as UnrolledProblem
from pes_optax._src.problem import unroll as unroll
from pes_optax._src.truncated_es import truncated_es as truncated_es
from pes_optax._src.uoro import UOROState as UOROState
from pes_optax._src.uoro import uoro as uoro

__version__ = "0.1.0"

__all__ = (
    "BPTTState",
    "Driver",
    "ESDiagnostics",
    "ESState",
    "GradientDiagnostics",
    "InnerTrainingState",
    "NONFINITE_POLICIES",
    "PESAState",
    "RTRLState",
    "RecurrentState",
    "TBPTTState",
    "UOROState",
    "UnrolledProblem",
    "bptt",
    "default_hyperparams_transform",
    "find_diagnostics",
    "from_flax_linen_rnn",
    "from_flax_nnx",
    "from_haiku",
    "full_es",
    "inner_training_problem",
    "nres",
    "pes",
    "pes_a",
    "recurrent_problem",
    "rtrl",
    "tbptt",
    "truncated_es",
    "unroll",
    "uoro",
)
