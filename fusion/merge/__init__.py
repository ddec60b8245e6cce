"""Weight merging over state dicts: a registry of methods (mergekit names), kernels, streaming, data-aware inputs.

    from fusion.merge import merge, merge_files, MERGE_METHODS
    sd = merge("ties", [sd1, sd2], base=sd0, density=0.2, scope="tensor", merge="mean")
    merge_files("linear", ["a.safetensors", "b.safetensors"], "out.safetensors")
    merge_files("ties", ["ft1/", "ft2/"], "merged/", base_path="base/", density=0.5)  # HF directories, sharded out

Methods: linear, uniform_soup, greedy_soup, task_arithmetic, ties, dare_linear, dare_ties, slerp,
breadcrumbs, model_stock, fisher, regmean (`names()`; `method_params(name)` lists each one's parameters,
`data_methods()` those that need data). task_arithmetic, ties, dare_* and breadcrumbs are one class,
`GeneralizedTaskArithmetic`, registered under five names (mergekit's design).
"""

from fusion.merge.registry import (
    MERGE_METHODS,
    MergeMethod,
    StateDict,
    TensorwiseMethod,
    check_weights,
    data_methods,
    get_merge,
    make_method,
    merge,
    method_params,
    names,
    register_merge,
)
from fusion.merge import methods as _methods  # noqa: F401  (registers the methods)
from fusion.merge.methods import GreedySoupResult, TiesGlobalStats, greedy_soup
from fusion.merge.generalized import GeneralizedTaskArithmetic, register_task_arithmetic
from fusion.merge.estimates import diagonal_fisher, has_batchnorm, regmean_grams, reset_bn
from fusion.merge.streaming import merge_files, streamable_methods
from fusion.merge.checkpoints import Checkpoint, open_checkpoint

__all__ = [
    "MERGE_METHODS", "MergeMethod", "StateDict", "TensorwiseMethod", "check_weights", "data_methods", "get_merge",
    "make_method", "merge", "method_params", "names", "register_merge", "GeneralizedTaskArithmetic",
    "register_task_arithmetic", "GreedySoupResult", "TiesGlobalStats",
    "greedy_soup", "diagonal_fisher", "has_batchnorm", "regmean_grams", "reset_bn", "merge_files",
    "streamable_methods", "Checkpoint", "open_checkpoint",
]
