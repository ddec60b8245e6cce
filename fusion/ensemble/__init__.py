"""Combiners: member outputs `(n_members, n_samples, n_outputs)` in, combined `(n_samples, n_outputs)` out.

Every combiner is a `torch.nn.Module` that exports inside the fused ensemble graph. Members always
hand over **logits** (classification) or raw predictions (regression); each combiner turns them into
probabilities (classification) or predictions (regression).
"""

from fusion.ensemble.base import COMBINERS, Combiner, check_weights, make_combiner, register_combiner
from fusion.ensemble import classification as _classification  # noqa: F401  (registers)
from fusion.ensemble import regression as _regression  # noqa: F401  (registers)
from fusion.ensemble.stacking import Stacking

__all__ = ["COMBINERS", "Combiner", "Stacking", "check_weights", "make_combiner", "register_combiner"]
