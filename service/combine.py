"""Members mode's combiner: fusion/combine.py, shared with the offline weight selection (torch-free)."""

from fusion.combine import NAMES, TINY, _softmax, calibrate, check_config, combine, member_weights  # noqa: F401
