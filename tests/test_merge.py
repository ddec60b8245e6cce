"""fusion.merge: registry, every method against a naive formula or a hand computation, purity, streaming."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusion.errors import ConfigError, UnknownNameError
from fusion.merge import (
    MERGE_METHODS,
    diagonal_fisher,
    greedy_soup,
    merge,
    merge_files,
    method_params,
    regmean_grams,
    reset_bn,
    streamable_methods,
)
from fusion.merge import kernels as K
from fusion.merge.streaming import radix_kth
from fusion.zoo import build_model

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "linear", "uniform_soup", "greedy_soup", "task_arithmetic", "ties", "dare_linear", "dare_ties",
    "slerp", "breadcrumbs", "model_stock", "fisher", "regmean",
}
MLP_ARGS = dict(in_features=6, hidden=(5, 4), n_outputs=3)
CNN_ARGS = dict(in_features=16, image_shape=(1, 4, 4), channels=(2, 3), hidden=5, n_outputs=3)


def _mlp_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = build_model("mlp", **MLP_ARGS)
    m.scaler.mean.fill_(0.5)  # equal across members, as in a zoo
    m.scaler.std.fill_(2.0)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _cnn_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny CNN whose BatchNorm buffers (and num_batches_tracked) differ per seed."""
    torch.manual_seed(seed)
    m = build_model("cnn", **CNN_ARGS).train()
    with torch.no_grad():
        for _ in range(seed % 3 + 1):
            m(torch.randn(8, 16))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _family(make, n=3, noise=0.1):
    """A base and n members = base + seeded noise on floating entries (fine-tuned-like)."""
    base = make(0)
    members = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        members.append({
            k: v + noise * torch.randn(v.shape, generator=g) if v.is_floating_point() and "scaler" not in k else v.clone()
            for k, v in base.items()
        })
    members[1]["bn1.num_batches_tracked"] = torch.tensor(7) if "bn1.num_batches_tracked" in base else None
    members = [{k: v for k, v in m.items() if v is not None} for m in members]
    return base, members


def _grams(members):
    g = torch.Generator().manual_seed(5)
    out = []
    for m in members:
        d = {}
        for k, v in m.items():
            if v.dim() == 2:
                x = torch.randn(20, v.shape[1], generator=g, dtype=torch.float64)
                d[k] = x.T @ x / 20
        out.append(d)
    return out


def _fishers(members):
    g = torch.Generator().manual_seed(6)
    return [{k: torch.rand(v.shape, generator=g) for k, v in m.items() if k.endswith("weight") and v.is_floating_point()} for m in members]


def _extra(name, members, base):
    """The inputs each method needs beyond models: base, score, fishers, grams; 2 models for slerp."""
    cls = MERGE_METHODS[name]
    kw = {}
    if cls.needs_base:
        kw["base"] = base
    if name == "greedy_soup":
        kw["score"] = lambda sd: -float(sum((v.double() ** 2).sum() for v in sd.values() if v.is_floating_point()))
    if name == "fisher":
        kw["fishers"] = _fishers(members)
    if name == "regmean":
        kw["grams"] = _grams(members)
    models = members[:2] if cls.max_models == 2 else members
    return models, kw


def _snapshot(states):
    return [{k: v.clone() for k, v in s.items()} for s in states]


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_holds_every_method_with_a_paper():
    assert set(MERGE_METHODS) == EXPECTED
    for name, cls in MERGE_METHODS.items():
        assert cls.name == name and cls.paper.startswith("https://"), name


def test_unknown_method_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        merge("tie", [_mlp_state(0)])
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    for name in EXPECTED:
        assert name in str(err.value)


def test_unknown_and_invalid_params_are_config_errors():
    sd = _mlp_state(0)
    with pytest.raises(ConfigError, match="expected parameters from .*got unknown \\['densty'\\]"):
        merge("ties", [sd, sd], base=sd, densty=0.3)
    with pytest.raises(ConfigError, match="expected density in \\(0.0, 1.0\\]; got 1.5"):
        merge("ties", [sd, sd], base=sd, density=1.5)
    with pytest.raises(ConfigError, match="expected scope in"):
        merge("ties", [sd, sd], base=sd, scope="layer")
    with pytest.raises(ConfigError, match="expected a base model"):
        merge("task_arithmetic", [sd, sd])
    with pytest.raises(ConfigError, match="expected no base model"):
        merge("linear", [sd, sd], base=sd)
    with pytest.raises(ConfigError, match="expected at most 2 models; got 3"):
        merge("slerp", [sd, sd, sd])
    with pytest.raises(ConfigError, match="expected score="):
        merge("greedy_soup", [sd, sd])
    assert method_params("ties") == {"density": 0.2, "scope": "tensor", "merge": "mean", "scaling": 1.0}


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1.0], "expected 2 weights, one per model; got 1"),
        ([1.0, -0.5], "expected non-negative weights; got -0.5 at index 1"),
        ([0.0, 0.0], "expected at least one positive weight; got all zeros"),
        ([1.0, float("nan")], "expected finite weights; got nan at index 1"),
        ("ab", "expected a sequence of 2 weights"),
    ],
)
def test_bad_weights_are_config_errors(weights, message):
    sd = _mlp_state(0)
    with pytest.raises(ConfigError, match=message):
        merge("linear", [sd, sd], weights=weights)


def test_mismatched_models_say_what_was_expected():
    a, b = _mlp_state(0), _mlp_state(1)
    b["layers.0.weight"] = b["layers.0.weight"][:, :5]
    with pytest.raises(ConfigError, match=r"model 1, entry 'layers.0.weight': expected shape \(5, 6\) torch.float32; got \(5, 5\)"):
        merge("linear", [a, b])
    c = dict(_mlp_state(1))
    del c["layers.2.bias"]
    with pytest.raises(ConfigError, match=r"model 1: expected the entries of model 0; got 1 missing \['layers.2.bias'\]"):
        merge("linear", [a, c])
    with pytest.raises(ConfigError, match="expected a sequence of state dicts"):
        merge("linear", a)
    with pytest.raises(ConfigError, match="uses no weights|expected no weights"):
        merge("uniform_soup", [a, a], weights=[1, 2])


# ---------------------------------------------------------------------------------------------
# the contract, for every registered method


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_contract_every_method(name, arch):
    """Keys, shapes and dtypes kept, finite values, inputs untouched, no shared storage, integer buffers copied."""
    base, members = _family(_mlp_state if arch == "mlp" else _cnn_state)
    models, kw = _extra(name, members, base)
    before = _snapshot(models + [base])
    out = merge(name, models, **kw)
    assert list(out) == list(models[0])
    inputs = [t for s in models + [base] for t in s.values()]
    for key, value in out.items():
        ref = models[0][key]
        assert value.shape == ref.shape and value.dtype == ref.dtype, key
        assert bool(torch.isfinite(value.double()).all()), key
        assert all(value.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in inputs), key
        if not ref.is_floating_point():
            assert torch.equal(value, ref), key  # copied from the first model, not averaged
    for snap, state in zip(before, models + [base]):
        assert all(torch.equal(snap[k], state[k]) for k in snap)


COPIES_PARAMS = {  # parameters under which merging N copies of one model must return that model
    "linear": {}, "uniform_soup": {}, "greedy_soup": {}, "slerp": {}, "model_stock": {}, "fisher": {}, "regmean": {},
    "task_arithmetic": {"scaling": 1 / 3}, "dare_linear": {"density": 1.0, "scaling": 1 / 3},
    "breadcrumbs": {"density": 1.0, "scaling": 1 / 3}, "ties": {"density": 1.0}, "dare_ties": {"density": 1.0},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_merging_copies_returns_the_model(name):
    assert set(COPIES_PARAMS) == EXPECTED
    base, (member, *_) = _family(_cnn_state)
    copies = [member, {k: v.clone() for k, v in member.items()}, {k: v.clone() for k, v in member.items()}]
    models, kw = _extra(name, copies, base)
    out = merge(name, models, **kw, **COPIES_PARAMS[name])
    for key in member:
        torch.testing.assert_close(out[key], member[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


# ---------------------------------------------------------------------------------------------
# each method against an independent reference


def test_linear_matches_the_naive_weighted_mean():
    _, members = _family(_mlp_state)
    w = [0.2, 1.0, 3.0]
    out = merge("linear", members, weights=w)
    for k in members[0]:
        ref = sum(wi * m[k].double() for wi, m in zip(w, members)) / sum(w)
        torch.testing.assert_close(out[k].double(), ref, rtol=1e-6, atol=1e-7)
    uniform = merge("uniform_soup", members)
    for k in members[0]:
        torch.testing.assert_close(uniform[k], torch.stack([m[k] for m in members]).mean(0), rtol=1e-6, atol=1e-7)


def test_half_precision_is_accumulated_in_float32():
    xs = [torch.full((1000,), 1.0, dtype=torch.bfloat16), *[torch.full((1000,), 2.0 ** -9, dtype=torch.bfloat16)] * 7]
    # bf16 has 8 mantissa bits: 1 + 2^-9 rounds to 1 at every step if accumulated in bf16
    out = K.linear_kernel(xs, [1.0] * 8)
    assert out.dtype == torch.bfloat16
    ref = ((1.0 + 7 * 2.0 ** -9) / 8)
    assert float(out[0]) == float(torch.tensor(ref, dtype=torch.bfloat16))


def test_blocked_kernels_do_not_depend_on_block_size(monkeypatch):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1000, generator=g) for _ in range(3)]
    b = torch.randn(1000, generator=g)
    full_lin, full_ta = K.linear_kernel(xs, [0.3, 1.0, 2.0]), K.task_arithmetic_kernel(xs, b, [0.5, 1.0, 2.0], 0.7)
    monkeypatch.setattr(K, "BLOCK_PER_THREAD", 37)
    assert torch.equal(K.linear_kernel(xs, [0.3, 1.0, 2.0]), full_lin)
    assert torch.equal(K.task_arithmetic_kernel(xs, b, [0.5, 1.0, 2.0], 0.7), full_ta)


def test_task_arithmetic_lambda_zero_returns_base_and_matches_formula():
    base, members = _family(_cnn_state)
    out = merge("task_arithmetic", members, base=base, scaling=0.0)
    assert all(torch.equal(out[k], base[k]) for k in base if base[k].is_floating_point())
    w, lam = [1.0, 0.5, 2.0], 0.4
    out = merge("task_arithmetic", members, base=base, weights=w, scaling=lam)
    for k, b in base.items():
        if b.is_floating_point():
            ref = b.double() + lam * sum(wi * (m[k].double() - b.double()) for wi, m in zip(w, members))
            torch.testing.assert_close(out[k].double(), ref, rtol=1e-5, atol=1e-6)


def test_dare_with_density_one_equals_task_arithmetic_and_ties_exactly():
    base, members = _family(_cnn_state)
    w = [1.0, 0.5, 2.0]
    ta = merge("task_arithmetic", members, base=base, weights=w, scaling=0.7)
    dl = merge("dare_linear", members, base=base, weights=w, scaling=0.7, density=1.0, seed=3)
    assert all(torch.equal(ta[k], dl[k]) for k in ta)
    for m in ("mean", "sum"):
        ties = merge("ties", members, base=base, weights=w, density=1.0, merge=m, scaling=0.7)
        dt = merge("dare_ties", members, base=base, weights=w, density=1.0, merge=m, scaling=0.7, seed=9)
        assert all(torch.equal(ties[k], dt[k]) for k in ties)


def test_dare_drops_with_probability_p_and_rescales_by_one_over_one_minus_p():
    n = 200_000
    base = {"w": torch.zeros(n)}
    tau = torch.linspace(1.0, 2.0, n)
    out = merge("dare_linear", [{"w": tau}], base=base, density=0.3, seed=1)["w"]
    kept = out != 0
    assert abs(float(kept.double().mean()) - 0.3) < 0.005  # P(keep) = 1 - p
    torch.testing.assert_close(out[kept], tau[kept] / 0.3)  # paper's rescale, not an L1 match
    assert abs(float(out.double().mean()) / float(tau.double().mean()) - 1.0) < 0.02  # unbiased
    again = merge("dare_linear", [{"w": tau}], base=base, density=0.3, seed=1)["w"]
    other = merge("dare_linear", [{"w": tau}], base=base, density=0.3, seed=2)["w"]
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_slerp_endpoints_orthogonal_case_and_lerp_fallback():
    a, b = _mlp_state(1), _mlp_state(2)
    s0, s1 = merge("slerp", [a, b], t=0.0), merge("slerp", [a, b], t=1.0)
    assert all(torch.equal(s0[k], a[k]) and torch.equal(s1[k], b[k]) for k in a)
    u, v = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    out = merge("slerp", [u, v], t=1 / 3)["w"]  # 90° arc: (cos 30°, sin 30°)
    torch.testing.assert_close(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    p, q = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([2.0, 4.0])}  # parallel: |cos| = 1 > 0.9995
    torch.testing.assert_close(merge("slerp", [p, q], t=0.25)["w"], torch.tensor([1.25, 2.5]))


# TIES by hand. Two task vectors over entries "w" and "v" (base = 0), density 0.4.
T1 = {"w": [3.0, -1.0, 2.0, 4.0, 0.5], "v": [0.2, -0.3, 0.1, 0.0, 0.0]}
T2 = {"w": [-2.0, -3.0, 1.0, 5.0, 0.0], "v": [6.0, 0.1, 0.0, 0.0, 0.0]}
TIES_EXPECTED = {
    # per tensor (mergekit): keep int(0.4·5) = 2 per tensor; zero vote -> +
    #   w: τ1 -> [3,0,0,4,0], τ2 -> [0,-3,0,5,0]; votes [+,-,+,+,+]
    #   v: τ1 -> [.2,-.3,0,0,0], τ2 -> [6,.1,0,0,0]; votes [+,-,+,+,+]
    ("tensor", "mean"): {"w": [3.0, -3.0, 0.0, 4.5, 0.0], "v": [3.1, -0.3, 0.0, 0.0, 0.0]},
    ("tensor", "sum"): {"w": [3.0, -3.0, 0.0, 9.0, 0.0], "v": [6.2, -0.3, 0.0, 0.0, 0.0]},
    # whole model (original): d = 10, k = 10 − int(4) = 6th smallest |τ| is the threshold
    #   τ1: 0,0,.1,.2,.3,[.5],1,2,3,4 -> keep >= .5: w all, v none
    #   τ2: 0,0,0,.1,.1,[1],2,3,5,6   -> keep >= 1: w [-2,-3,1,5,0], v [6,0,0,0,0]
    #   votes w [+,-,+,+,+], v [+,0,0,0,0]
    ("global", "mean"): {"w": [3.0, -2.0, 1.5, 4.5, 0.5], "v": [6.0, 0.0, 0.0, 0.0, 0.0]},
    ("global", "sum"): {"w": [3.0, -4.0, 3.0, 9.0, 0.5], "v": [6.0, 0.0, 0.0, 0.0, 0.0]},
}


@pytest.mark.parametrize("scope, func", sorted(TIES_EXPECTED))
def test_ties_by_hand(scope, func):
    base = {k: torch.zeros(5) for k in T1}
    models = [{k: torch.tensor(v) for k, v in t.items()} for t in (T1, T2)]
    out = merge("ties", models, base=base, density=0.4, scope=scope, merge=func)
    for k, v in TIES_EXPECTED[(scope, func)].items():
        torch.testing.assert_close(out[k], torch.tensor(v), msg=k)
    shifted = {k: torch.ones(5) for k in T1}  # θ_base + λ·merged with a non-zero base
    models = [{k: v + 1 for k, v in m.items()} for m in models]
    scaled = merge("ties", models, base=shifted, density=0.4, scope=scope, merge=func, scaling=0.5)
    for k, v in TIES_EXPECTED[(scope, func)].items():
        torch.testing.assert_close(scaled[k], 1 + 0.5 * torch.tensor(v), msg=k)


def test_ties_weighted_votes_and_zero_vote_conventions():
    base = {"w": torch.zeros(5)}
    models = [{"w": torch.tensor(T1["w"])}, {"w": torch.tensor(T2["w"])}]
    # weights (1, 2): trimmed τ as above; weighted mean Σwτm/Σwm -> [3, -6/2, 0, (4+10)/3, 0]
    out = merge("ties", models, base=base, weights=[1, 2], density=0.4)["w"]
    torch.testing.assert_close(out, torch.tensor([3.0, -3.0, 0.0, 14 / 3, 0.0]))
    # entry 0 votes 2 + (-2) = 0: mergekit picks +, the original picks the model-wide majority (here −)
    tie = [{"w": torch.tensor([2.0, -1.0, -1.0, -1.0])}, {"w": torch.tensor([-2.0, -1.0, -1.0, -1.0])}]
    zero = {"w": torch.zeros(4)}
    torch.testing.assert_close(merge("ties", tie, base=zero, density=1.0)["w"], torch.tensor([2.0, -1, -1, -1]))
    torch.testing.assert_close(merge("ties", tie, base=zero, density=1.0, scope="global")["w"], torch.tensor([-2.0, -1, -1, -1]))


def test_breadcrumbs_by_hand():
    tau = torch.tensor([3.0, -1.0, 10.0, 2.0, -7.0, 5.0, 4.0, -9.0, 6.0, 8.0])
    # n = 10, density 0.5 -> 5 survive; γ = 0.1 drops the largest (10); the 4 smallest (1,2,3,4) go
    out = merge("breadcrumbs", [{"w": tau}], base={"w": torch.zeros(10)}, density=0.5, gamma=0.1)["w"]
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, 0.0, -7.0, 5.0, 0.0, -9.0, 6.0, 8.0]))


def test_model_stock_by_hand():
    base = {"w": torch.tensor([1.0, 1.0])}
    a, b = {"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([2.0, 1.0])}  # τ = (1,1), (1,0): cos = 1/√2
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    expected = t * torch.tensor([2.0, 1.5]) + (1 - t) * base["w"]
    torch.testing.assert_close(merge("model_stock", [a, b], base=base)["w"], expected)
    opposite = {"w": torch.tensor([0.0, 0.0])}  # τ = (−1, −1) vs (1, 1): cos < 0 is clamped, the base is kept
    torch.testing.assert_close(merge("model_stock", [a, opposite], base=base)["w"], base["w"])


def _naive_greedy(models, score):
    """The official loop: sort by score, start with the best, add an ingredient on strict improvement."""
    order = sorted(range(len(models)), key=lambda i: -score(models[i]))
    chosen, best = [order[0]], score(models[order[0]])
    for i in order[1:]:
        cand = {"w": torch.stack([models[j]["w"] for j in chosen + [i]]).mean(0)}
        if score(cand) > best:
            chosen, best = chosen + [i], score(cand)
    return chosen, best


def test_greedy_soup_follows_the_official_rule():
    target = torch.tensor([1.0, 1.0])
    models = [{"w": torch.tensor(v)} for v in ([3.0, 3.0], [1.0, 1.5], [1.0, 0.5], [0.0, 0.0], [1.0, 1.5])]

    def score(sd):  # higher is better: minus the distance to the target
        return -float((sd["w"] - target).norm())

    res = greedy_soup(models, score)
    chosen, best = _naive_greedy(models, score)
    # 1, 2 and 4 tie at −0.5 (input order kept); 1 + 2 reach the target; 4 would move away
    assert list(res.selected) == chosen == [1, 2]
    torch.testing.assert_close(res.state_dict["w"], target)
    assert res.soup_score == best == 0.0
    torch.testing.assert_close(merge("greedy_soup", models, score=score)["w"], target)


def test_greedy_soup_adds_only_on_strict_improvement():
    models = [{"w": torch.tensor(v)} for v in ([3.0, 3.0], [1.0, 5.0], [1.0, -3.0], [0.0, 0.0])]

    def score(sd):  # only the first coordinate matters: adding model 2 to model 1 keeps the score equal
        return -abs(float(sd["w"][0]) - 1.0)

    res = greedy_soup(models, score)
    assert list(res.selected) == _naive_greedy(models, score)[0] == [1]
    assert res.ingredient_scores == (-2.0, 0.0, 0.0, -1.0)


def test_fisher_merge_matches_the_formula():
    _, members = _family(_mlp_state)
    fishers = _fishers(members)
    w = [1.0, 2.0, 0.5]
    out = merge("fisher", members, fishers=fishers, weights=w, floor=1e-6)
    for k in members[0]:
        if k in fishers[0]:
            f = [fi[k].double().clamp_min(1e-6) * wi for fi, wi in zip(fishers, w)]
            ref = sum(fi * m[k].double() for fi, m in zip(f, members)) / sum(f)
        else:  # no Fisher (biases, buffers): the weighted mean
            ref = sum(wi * m[k].double() for wi, m in zip(w, members)) / sum(w)
        torch.testing.assert_close(out[k].double(), ref, rtol=1e-5, atol=1e-6)
    bad = [dict(f) for f in fishers]
    bad[0]["layers.0.weight"] = -bad[0]["layers.0.weight"]
    with pytest.raises(ConfigError, match="non-negative"):
        merge("fisher", members, fishers=bad)
    with pytest.raises(ConfigError, match="expected 3 fishers, one per model; got 2"):
        merge("fisher", members, fishers=fishers[:2])


def _naive_fisher(model, X, labels_fn):
    """Per-example squared gradients with plain autograd, one example at a time."""
    acc = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in model.named_parameters()}
    model.eval()
    for x in X:
        logp = torch.log_softmax(model(x[None]), -1)[0]
        for label, weight in labels_fn(logp.detach()):
            model.zero_grad()
            logp[label].backward(retain_graph=True)
            for k, p in model.named_parameters():
                acc[k] += weight * p.grad.double() ** 2
    return {k: v / len(X) for k, v in acc.items()}


@pytest.mark.parametrize("mode", ["predicted", "expected"])
def test_diagonal_fisher_matches_per_example_autograd(mode):
    torch.manual_seed(0)
    model = build_model("mlp", **MLP_ARGS)
    X = torch.randn(12, 6)
    fast = diagonal_fisher(model, X, mode=mode, batch_size=5)
    if mode == "predicted":
        ref = _naive_fisher(model, X, lambda lp: [(int(lp.argmax()), 1.0)])
    else:
        ref = _naive_fisher(model, X, lambda lp: [(c, float(lp[c].exp())) for c in range(len(lp))])
    assert set(fast) == {k for k, _ in model.named_parameters()}
    for k in ref:
        torch.testing.assert_close(fast[k].double(), ref[k], rtol=1e-4, atol=1e-7)


def test_diagonal_fisher_modes():
    torch.manual_seed(1)
    model = build_model("mlp", **MLP_ARGS)
    X = torch.randn(20, 6)
    with torch.no_grad():
        predicted_labels = model(X).argmax(-1)
    predicted = diagonal_fisher(model, X)
    empirical = diagonal_fisher(model, X, mode="empirical", y=predicted_labels.numpy())
    assert all(torch.equal(predicted[k], empirical[k]) for k in predicted)
    s1, s2 = diagonal_fisher(model, X, mode="sampled", seed=3), diagonal_fisher(model, X, mode="sampled", seed=3)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    with pytest.raises(ConfigError, match="expected mode in"):
        diagonal_fisher(model, X, mode="exact")
    with pytest.raises(ConfigError, match="mode 'empirical' expected labels y of length 20; got None"):
        diagonal_fisher(model, X, mode="empirical")
    with pytest.raises(ConfigError, match=r"expected features of shape \(n_samples >= 1, n_features\); got \(6,\)"):
        diagonal_fisher(model, X[0])


def test_regmean_grams_and_solution_match_least_squares():
    torch.manual_seed(0)
    models = [build_model("mlp", in_features=6, hidden=(), n_outputs=3) for _ in range(2)]  # one Linear: exact check
    Xs = [torch.randn(40, 6), torch.randn(40, 6) * 2 + 1]
    grams = [regmean_grams(m, X) for m, X in zip(models, Xs)]
    for g, X in zip(grams, Xs):
        torch.testing.assert_close(g["layers.0.weight"], X.double().T @ X.double() / 40)
    states = [m.state_dict() for m in models]
    out = merge("regmean", states, grams=grams, alpha=1.0)
    # alpha = 1: W* minimises Σ_i ||X_i Wᵀ − X_i W_iᵀ||² (equal n_i), i.e. least squares on the stacked data
    A = torch.cat([X.double() for X in Xs])
    B = torch.cat([X.double() @ s["layers.0.weight"].double().T for X, s in zip(Xs, states)])
    ref = torch.linalg.lstsq(A, B).solution.T
    torch.testing.assert_close(out["layers.0.weight"].double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["layers.0.bias"], (states[0]["layers.0.bias"] + states[1]["layers.0.bias"]) / 2)
    # alpha < 1 against the closed form with an explicit inverse
    out = merge("regmean", states, grams=grams, alpha=0.5)
    gt = [g["layers.0.weight"] * 0.5 + torch.diag(torch.diagonal(g["layers.0.weight"])) * 0.5 for g in grams]
    ref = (torch.linalg.inv(gt[0] + gt[1]) @ sum(g @ s["layers.0.weight"].double().T for g, s in zip(gt, states))).T
    torch.testing.assert_close(out["layers.0.weight"].double(), ref, rtol=1e-4, atol=1e-5)


def test_reset_bn_recomputes_statistics_from_data():
    torch.manual_seed(0)
    model = build_model("cnn", **CNN_ARGS).eval()
    X = torch.randn(50, 16) * 3 + 1
    reset_bn(model, X, batch_size=64)  # one batch: exact statistics
    h = model.conv1(model.scaler(X).reshape(-1, 1, 4, 4))  # (50, 2, 4, 4)
    torch.testing.assert_close(model.bn1.running_mean, h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert not model.training


# ---------------------------------------------------------------------------------------------
# streaming


def _write_family(tmp_path, states, base, dtype=None):
    paths = []
    for i, s in enumerate(states + [base]):
        s = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in s.items()}
        p = tmp_path / f"m{i}.safetensors"
        save_file(s, str(p))
        paths.append(p)
    return paths[:-1], paths[-1]


STREAM_CASES = [
    ("linear", {}, {"weights": [0.5, 1.0, 2.0]}),
    ("uniform_soup", {}, {}),
    ("task_arithmetic", {"scaling": 0.6}, {"weights": [1.0, 0.0, 3.0]}),
    ("ties", {"density": 0.3}, {}),
    ("ties", {"density": 0.3, "scope": "global", "merge": "sum"}, {"weights": [1.0, 2.0, 0.5]}),
    ("dare_linear", {"density": 0.4, "seed": 4}, {}),
    ("dare_ties", {"density": 0.6}, {}),
    ("slerp", {"t": 0.3}, {}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}, {}),
    ("model_stock", {}, {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name, params, extra", STREAM_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(STREAM_CASES)])
def test_streaming_equals_in_memory_bit_for_bit(tmp_path, name, params, extra, dtype):
    assert {c[0] for c in STREAM_CASES} == set(streamable_methods())
    base, members = _family(_cnn_state)
    paths, base_path = _write_family(tmp_path, members, base, dtype)
    loaded = [load_file(str(p)) for p in paths]
    loaded_base = load_file(str(base_path))
    cls = MERGE_METHODS[name]
    n = cls.max_models or 3
    kw = {"base": loaded_base} if cls.needs_base else {}
    expected = merge(name, loaded[:n], **kw, **extra, **params)
    out_path = tmp_path / "out.safetensors"
    summary = merge_files(name, paths[:n], out_path, base_path=base_path if cls.needs_base else None,
                          metadata={"method": name}, chunk_bytes=24, **extra, **params)
    got = load_file(str(out_path))
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    json.dumps(summary)
    from safetensors import safe_open
    with safe_open(str(out_path), "pt") as f:
        assert f.metadata() == {"method": name}


def test_streaming_refuses_whole_model_methods_and_checks_layouts(tmp_path):
    base, members = _family(_mlp_state)
    paths, base_path = _write_family(tmp_path, members, base)
    with pytest.raises(ConfigError, match="needs whole models in memory; expected one of"):
        merge_files("fisher", paths, tmp_path / "o.safetensors", fishers=_fishers(members))
    odd = dict(members[0])
    odd["layers.0.weight"] = odd["layers.0.weight"][:2].contiguous()
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ConfigError, match="entry 'layers.0.weight': expected shape"):
        merge_files("linear", [paths[0], tmp_path / "odd.safetensors"], tmp_path / "o.safetensors")
    with pytest.raises(ConfigError, match="no such file"):
        merge_files("linear", [paths[0], tmp_path / "missing.safetensors"], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_select_equals_kthvalue(dtype):
    g = torch.Generator().manual_seed(0)
    sets = [torch.randn(5000, generator=g, dtype=dtype).abs(), torch.randint(0, 7, (3000,), generator=g).to(dtype) * 0.25]
    sets[0][:100] = 0.0  # zeros and many duplicates (the second set) are the hard cases
    cases = [(s, k) for s in sets for k in (1, 1500, len(s))]
    int_dtype = torch.int32 if dtype == torch.float32 else torch.int64

    def histogram(prefixes, shift):
        out = []
        for i, (s, _) in enumerate(cases):
            bits = s.view(int_dtype)
            if prefixes is not None:
                bits = bits[(bits >> (shift + 16)) == prefixes[i]]
            out.append(torch.bincount(((bits >> shift) & 0xFFFF).long(), minlength=65536))
        return out

    found = radix_kth(histogram, [k for _, k in cases], 32 if dtype == torch.float32 else 64)
    for bits, (s, k) in zip(found, cases):
        assert float(torch.tensor([bits], dtype=int_dtype).view(dtype)[0]) == float(s.kthvalue(k).values)


def test_bench_smoke_runs_and_reports_json():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_merge.py"), "--smoke"], capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["streaming_equals_in_memory"] is True
    assert result["throughput_ratio"] > 0 and result["stream_peak_rss_bytes"] > 0
