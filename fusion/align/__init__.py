"""Permutation alignment of independently trained models (Git Re-Basin), and REPAIR after interpolation.

    from fusion.align import spec_for, weight_matching, apply_permutation
    spec = spec_for("mlp", {"hidden": [256, 256]})
    perm = weight_matching(spec, ref_sd, other_sd)
    aligned = apply_permutation(spec, perm, other_sd)   # same function as other_sd, ref's basis

Any other architecture (timm/torchvision ResNets, CNNs with BatchNorm, MLPs): `fx_spec(model, example_input)`
derives the spec from a torch.fx trace (fusion/align/fx_spec.py); transformers are refused.
"""

from fusion.align.spec import (
    SPECS,
    ActivationPoint,
    AxisRef,
    PermutationSpec,
    apply_permutation,
    cnn_spec,
    identity_perm,
    invert_perm,
    mlp_spec,
    permuted_entry,
    random_perm,
    spec_for,
)
from fusion.align.matching import AlignResult, activation_matching, activation_stats, align_to_reference, weight_matching
from fusion.align.repair import repair
from fusion.align.fx_spec import fx_spec, refuse_transformers, same_groups, spec_for_module

__all__ = [
    "SPECS", "ActivationPoint", "AxisRef", "PermutationSpec", "apply_permutation", "cnn_spec",
    "identity_perm", "invert_perm", "mlp_spec", "permuted_entry", "random_perm", "spec_for",
    "AlignResult", "activation_matching", "activation_stats", "align_to_reference", "weight_matching",
    "repair", "fx_spec", "refuse_transformers", "same_groups", "spec_for_module",
]
