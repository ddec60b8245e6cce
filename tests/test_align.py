"""fusion.align: permutation specs of the zoo, planted permutations recovered exactly, REPAIR statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion.align import (
    activation_matching,
    align_to_reference,
    apply_permutation,
    invert_perm,
    random_perm,
    repair,
    spec_for,
    weight_matching,
)
from fusion.connectivity import lerp_state
from fusion.errors import ConfigError, UnknownNameError
from fusion.zoo import TrainConfig, build_model, init_scaler, seed_everything, train

ARGS = {"mlp": {"hidden": [32, 24]}, "cnn": {"channels": [4, 8], "hidden": 16}}


@pytest.fixture(scope="module")
def data(digits):
    return digits  # the session's digits split (tests/conftest.py); torch runs on one thread there too


def _trained(arch: str, seed: int, data, epochs: int = 2):
    seed_everything(seed)
    model = build_model(arch, **ARGS[arch])
    init_scaler(model, data.scaling)
    return train(model, data, TrainConfig(epochs=epochs), seed, desc=f"{arch}{seed}")


@pytest.fixture(scope="module")
def trained(data):
    """One briefly trained, seeded MLP and CNN on digits (the CNN's BN statistics are real)."""
    return {"mlp": _trained("mlp", 0, data, epochs=2), "cnn": _trained("cnn", 0, data, epochs=1)}


def _load(arch: str, state):
    m = build_model(arch, **ARGS[arch])
    m.load_state_dict(state)
    return m.eval()


def test_spec_for_names_and_defaults():
    with pytest.raises(UnknownNameError, match=r"expected one of \['cnn', 'mlp'\]"):
        spec_for("resnet")
    assert sorted(spec_for("mlp", {}).perms) == ["layers.0", "layers.1"]  # zoo default hidden=(256, 256)
    cnn = spec_for("cnn", {"channels": [4, 8]})
    fc1_in = [ref for ref in cnn.perms["conv2"] if ref.key == "fc1.weight"][0]
    assert fc1_in.axis == 1 and fc1_in.block == 16  # 8x8 digits pooled to 4x4 positions per channel
    assert "bn1.running_var" in {r.key for r in cnn.perms["conv1"]} and "bn1.running_var" in cnn.cost_exclude
    with pytest.raises(ConfigError, match="architecture 'mlp': expected its constructor arguments"):
        spec_for("mlp", {"width": 3})


def test_spec_is_checked_against_the_state_dict(trained):
    sd = trained["mlp"].state_dict()
    with pytest.raises(ConfigError, match=r"permutation 'layers.2': expected entry 'layers.3.weight' in the state dict"):
        spec_for("mlp", {"hidden": [32, 24, 8]}).sizes(sd)  # a spec is structural: depth must match
    good = spec_for("mlp", ARGS["mlp"])
    bad = dict(sd, **{"layers.0.bias": sd["layers.0.bias"][:5]})
    with pytest.raises(ConfigError, match=r"permutation 'layers.0': expected 32 units on 'layers.0.bias' axis 0; got 5"):
        good.sizes(bad)
    with pytest.raises(ConfigError, match="expected a permutation of range\\(32\\)"):
        apply_permutation(good, {"layers.0": torch.zeros(32, dtype=torch.long)}, sd)
    with pytest.raises(ConfigError, match="expected permutation names from"):
        apply_permutation(good, {"layers.9": torch.arange(3)}, sd)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_permuted_copy_computes_the_same_function(arch, trained, data):
    model = trained[arch]
    spec = spec_for(arch, ARGS[arch])
    sd = model.state_dict()
    permuted = apply_permutation(spec, random_perm(spec, sd, seed=1), sd)
    assert any(not torch.equal(permuted[k], sd[k]) for k in sd)
    X = torch.as_tensor(data.X_test)
    with torch.no_grad():
        torch.testing.assert_close(_load(arch, permuted)(X), model.eval()(X), rtol=1e-5, atol=1e-5)


def test_fc1_columns_follow_conv2_channels_channel_major(trained):
    """Independent reference: view fc1's input as (C, H, W) and permute C."""
    spec = spec_for("cnn", ARGS["cnn"])
    sd = trained["cnn"].state_dict()
    perm = random_perm(spec, sd, seed=3)
    out = apply_permutation(spec, perm, sd)
    w = sd["fc1.weight"].reshape(16, 8, 4, 4)[:, perm["conv2"]].reshape(16, -1)
    w = w[perm["fc1"]]
    assert torch.equal(out["fc1.weight"], w)
    assert torch.equal(out["bn2.running_mean"], sd["bn2.running_mean"][perm["conv2"]])
    assert torch.equal(out["bn2.num_batches_tracked"], sd["bn2.num_batches_tracked"])


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("matcher", ["weight", "activation"])
def test_planted_permutation_is_recovered_exactly(arch, matcher, trained, data):
    model = trained[arch]
    spec = spec_for(arch, ARGS[arch])
    sd = model.state_dict()
    planted = random_perm(spec, sd, seed=7)
    permuted = apply_permutation(spec, planted, sd)
    if matcher == "weight":
        found = weight_matching(spec, sd, permuted, seed=0)
    else:
        found = activation_matching(model, _load(arch, permuted), data.X_train[:300], spec)
    inverse = invert_perm(planted)
    assert all(torch.equal(found[p], inverse[p]) for p in planted)
    recovered = apply_permutation(spec, found, permuted)
    assert all(torch.equal(recovered[k], sd[k]) for k in sd)


def _objective(spec, a, b):
    return sum(float((a[r.key].double() * b[r.key].double()).sum()) for refs in spec.perms.values() for r in refs if r.key not in spec.cost_exclude)


def test_weight_matching_is_seeded_and_raises_similarity(data):
    a, b = _trained("mlp", 1, data, epochs=1).state_dict(), _trained("mlp", 2, data, epochs=1).state_dict()
    spec = spec_for("mlp", ARGS["mlp"])
    p1 = weight_matching(spec, a, b, seed=0)
    p2 = weight_matching(spec, a, b, seed=0)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert _objective(spec, a, apply_permutation(spec, p1, b)) > _objective(spec, a, b)
    with pytest.raises(ConfigError, match="expected max_iter >= 1"):
        weight_matching(spec, a, b, max_iter=0)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_align_to_reference_for_several_models(method, trained, data):
    spec = spec_for("cnn", ARGS["cnn"])
    ref = trained["cnn"].state_dict()
    others = [apply_permutation(spec, random_perm(spec, ref, seed=s), ref) for s in (11, 12, 13)]
    res = align_to_reference(ref, others, spec, method=method, model=trained["cnn"], X=data.X_train[:300])
    assert len(res.state_dicts) == len(res.perms) == 3
    for aligned in res.state_dicts:
        assert all(torch.equal(aligned[k], ref[k]) for k in ref)
    with pytest.raises(ConfigError, match="method 'activation' expected model="):
        align_to_reference(ref, others, spec, method="activation")


def _pre_activation_stats(model, module_name, X):
    """Mean and population std per unit of a Linear's output, with a plain forward hook."""
    store = {}

    def hook(_module, _inputs, output):  # returns None: the output is left as it is
        store["h"] = output.detach().double()

    handle = dict(model.named_modules())[module_name].register_forward_hook(hook)
    with torch.no_grad():
        model(torch.as_tensor(X))
    handle.remove()
    h = store["h"]
    return h.mean(0), h.std(0, unbiased=False)


def test_repair_restores_interpolated_unit_statistics(data):
    spec = spec_for("mlp", ARGS["mlp"])
    a, b = _trained("mlp", 3, data), _trained("mlp", 4, data)
    b_aligned = _load("mlp", apply_permutation(spec, weight_matching(spec, a.state_dict(), b.state_dict()), b.state_dict()))
    merged = _load("mlp", lerp_state(a.state_dict(), b_aligned.state_dict(), 0.5))
    X = data.X_train
    repaired = repair(merged, a, b_aligned, X, spec, lam=0.5)
    assert repaired is merged
    for layer in ("layers.0", "layers.1"):
        ma, sa = _pre_activation_stats(a, layer, X)
        mb, sb = _pre_activation_stats(b_aligned, layer, X)
        mm, sm = _pre_activation_stats(merged, layer, X)
        torch.testing.assert_close(mm, (ma + mb) / 2, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(sm, (sa + sb) / 2, rtol=1e-3, atol=1e-3)


def test_repair_resets_batchnorm_and_fixes_fc1(trained, data):
    spec = spec_for("cnn", ARGS["cnn"])
    a = trained["cnn"]
    b = _load("cnn", apply_permutation(spec, random_perm(spec, a.state_dict(), seed=2), a.state_dict()))
    # a permuted copy is the same function: its midpoint with a (unaligned) is not, and REPAIR must
    # restore fc1's statistics to a's (both endpoints have the same statistics, up to order)
    b_aligned = _load("cnn", apply_permutation(spec, weight_matching(spec, a.state_dict(), b.state_dict()), b.state_dict()))
    merged = _load("cnn", lerp_state(a.state_dict(), b_aligned.state_dict(), 0.5))
    repair(merged, a, b_aligned, data.X_train, spec)
    ma, sa = _pre_activation_stats(a, "fc1", data.X_train)
    mm, sm = _pre_activation_stats(merged, "fc1", data.X_train)
    torch.testing.assert_close(mm, ma, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(sm, sa, rtol=1e-3, atol=1e-3)
    assert not np.allclose(merged.bn1.running_mean.numpy(), a.bn1.running_mean.numpy())  # recomputed on X_train
