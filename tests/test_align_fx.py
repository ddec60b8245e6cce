"""Permutation specs derived from torch.fx (issue 16 part 4): ResNets with BatchNorm and residual adds
from timm and torchvision, the zoo's MLP/CNN against their hand-written specs, transformers refused."""

from __future__ import annotations

import copy

import pytest
import torch

from fusion.align import activation_matching, activation_stats, apply_permutation, random_perm, spec_for, weight_matching
from fusion.align.fx_spec import fx_spec, same_groups, spec_for_module
from fusion.errors import ConfigError
from fusion.zoo import build_model

ZOO = {"mlp": {"hidden": [32, 24]}, "cnn": {"channels": [4, 8], "hidden": 16}}


def _resnet(lib: str) -> torch.nn.Module:
    """A tiny random ResNet: timm resnet10t (deep stem, avg-pool downsample) or torchvision resnet18."""
    if lib == "timm":
        timm = pytest.importorskip("timm")
        return timm.create_model("resnet10t", pretrained=False, num_classes=5, channels=(8, 16, 24, 32), stem_width=8)
    tv = pytest.importorskip("torchvision")
    return tv.models.resnet18(weights=None, num_classes=5)


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so a wrong channel order would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("lib", ["timm", "torchvision"])
def test_random_permutation_of_a_resnet_leaves_outputs_unchanged(lib):
    torch.manual_seed(0)
    model = _resnet(lib).eval()
    _randomise_bn(model)
    x = torch.randn(3, 3, 32, 32)
    spec = fx_spec(model, x[:1])
    # residual adds join spaces: some permutation covers the stem and a whole stage's residual stream
    assert max(len(refs) for refs in spec.perms.values()) >= 10
    keys = {(ref.key, ref.axis) for refs in spec.perms.values() for ref in refs}
    assert any("downsample" in k and k.endswith("running_var") for k, _ in keys)  # shortcut BN statistics follow
    assert ("fc.weight", 1) in keys and ("fc.weight", 0) not in keys  # the classifier's outputs stay frozen
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    permuted = apply_permutation(spec, random_perm(spec, sd, seed=1), sd)
    moved = sum(not torch.equal(permuted[k], sd[k]) for k in sd)
    assert moved > len(sd) // 2  # most entries really moved
    model.load_state_dict(permuted)
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max().item() < 1e-5


def test_weight_matching_recovers_a_planted_permutation_of_a_resnet():
    torch.manual_seed(0)
    model = _resnet("timm").eval()
    _randomise_bn(model)
    spec = fx_spec(model, torch.randn(1, 3, 32, 32))
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    planted = random_perm(spec, ref, seed=3)
    other = apply_permutation(spec, planted, ref)
    perm = weight_matching(spec, ref, other)
    back = apply_permutation(spec, perm, other)
    assert all(torch.equal(back[k], ref[k]) for k in ref)  # the same weights: perm ∘ planted = identity
    for p in planted:
        assert torch.equal(planted[p][perm[p]], torch.arange(len(perm[p])))


def test_activation_matching_with_an_fx_spec_on_images():
    torch.manual_seed(0)
    model = _resnet("timm").eval()
    _randomise_bn(model)
    X = torch.randn(16, 3, 32, 32)
    spec = fx_spec(model, X[:1])
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    other = copy.deepcopy(model)
    planted = random_perm(spec, ref, seed=5)
    other.load_state_dict(apply_permutation(spec, planted, ref))
    perm = activation_matching(model, other.eval(), X, spec)
    stats = activation_stats(model, other, X, spec)
    for p in spec.perms:
        recovered = planted[p][perm[p]] == torch.arange(len(perm[p]))
        # every unit that varies on X is matched to its own copy (correlation 1); units with zero variance
        # (ReLU'd off on all 16 images) correlate with nothing and may land anywhere
        alive = stats[p]["std_a"] > 1e-6
        assert bool(recovered[alive].all()), p
        assert alive.float().mean() > 0.5, p


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_fx_spec_of_the_zoo_equals_the_hand_written_spec(arch):
    model = build_model(arch, **ZOO[arch]).eval()
    derived = fx_spec(model, torch.zeros(2, 64))
    hand = spec_for(arch, ZOO[arch])
    assert same_groups(derived, hand)
    assert sorted(derived.perms) == sorted(hand.perms)  # named after the module that opens each space
    assert dict(derived.activations) == dict(hand.activations)
    assert derived.cost_exclude == hand.cost_exclude
    # the hand-written spec stays the override for zoo architectures
    assert spec_for_module(model, torch.zeros(2, 64), arch=arch, args=ZOO[arch]) == hand


def test_unknown_ops_inputs_and_outputs_stay_frozen():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = torch.cumsum(h, dim=1)  # mixes units: a's space must stay the identity
            return self.c(torch.relu(self.b(h)))

    spec = fx_spec(Odd(), torch.zeros(1, 4))
    assert sorted(spec.perms) == ["b"]
    assert {(r.key, r.axis) for r in spec.perms["b"]} == {("b.weight", 0), ("b.bias", 0), ("c.weight", 1)}


def test_a_transformer_is_refused_with_a_clear_message():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=8)
    bert = transformers.BertForSequenceClassification(cfg)
    with pytest.raises(ConfigError, match=r"got a transformer .*not supported\. Merge fine-tunes of one shared base"):
        fx_spec(bert, torch.zeros(1, 8, dtype=torch.long))
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(ConfigError, match="got a transformer"):
        fx_spec(layer, torch.zeros(1, 4, 16))


def test_align_cli_with_a_timm_source_recovers_a_planted_permutation(tmp_path, capsys):
    pytest.importorskip("timm")
    from safetensors.torch import load_file, save_file

    from fusion.cli import main

    args = {"num_classes": 5, "channels": [8, 16, 24, 32], "stem_width": 8}
    torch.manual_seed(0)
    model = _resnet("timm").eval()
    _randomise_bn(model)
    ref = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    spec = fx_spec(model, torch.zeros(1, 3, 32, 32))
    other = apply_permutation(spec, random_perm(spec, ref, seed=7), ref)
    save_file(ref, str(tmp_path / "a.safetensors"))
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "b.safetensors"))
    import json

    code = main(["align", "--reference", str(tmp_path / "a.safetensors"), "--models", str(tmp_path / "b.safetensors"),
                 "--out-dir", str(tmp_path / "out"), "--source", "timm:resnet10t", "--args", json.dumps(args),
                 "--input-shape", "3,32,32"])
    assert code == 0, capsys.readouterr().err
    aligned = load_file(str(tmp_path / "out" / "b.safetensors"))
    assert all(torch.equal(aligned[k], ref[k]) for k in ref)
    assert "permutations from the torch.fx spec of timm:resnet10t" in capsys.readouterr().out
    # no spec next to the checkpoints and no --source: the error says what to pass
    code = main(["align", "--reference", str(tmp_path / "a.safetensors"), "--models", str(tmp_path / "b.safetensors"),
                 "--out-dir", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert code != 0 and "pass --arch (a zoo architecture) or --source" in err


def test_a_module_called_twice_keeps_its_spaces_fixed():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.s, self.c = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.s(torch.relu(self.a(x))))
            return self.c(torch.relu(self.s(h)))  # `s` again: its weight cannot take two permutations

    model = Shared().eval()
    spec = fx_spec(model, torch.zeros(1, 4))
    assert spec.perms == {}
    x = torch.randn(5, 4)
    sd = model.state_dict()
    with torch.no_grad():
        before = model(x)
        model.load_state_dict(apply_permutation(spec, random_perm(spec, sd), sd))
        assert torch.equal(model(x), before)


def _permuted_outputs_match(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Max |output change| after applying a random permutation of `fx_spec(model)` to its weights."""
    model.eval()
    spec = fx_spec(model, x[:1])
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    model.load_state_dict(apply_permutation(spec, random_perm(spec, sd, seed=1), sd))
    with torch.no_grad():
        after = model(x)
    return (after - before).abs().max().item()


def test_a_per_channel_prelu_follows_its_space():
    """PReLU(num_parameters=C) has one slope per unit: permuting the units must permute the slopes too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.PReLU(6), torch.nn.Linear(6, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(-2, 2, 6))
    spec = fx_spec(model, torch.zeros(1, 4))
    assert ("1.weight", 0) in {(r.key, r.axis) for refs in spec.perms.values() for r in refs}
    assert _permuted_outputs_match(model, torch.randn(8, 4)) < 1e-5


def test_a_pool_over_the_unit_axis_freezes_its_space():
    """A 1-d pool of a Linear's (B, F) output slides over the units themselves: not permutation-equivariant."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.MaxPool1d(3, stride=1, padding=1), torch.nn.Linear(6, 3))
    spec = fx_spec(model, torch.zeros(1, 4))
    assert "0" not in spec.perms
    assert _permuted_outputs_match(model, torch.randn(8, 4)) < 1e-5


def test_align_refuses_outputs_that_collide_or_overwrite_an_input(tmp_path):
    """Outputs are `<out_dir>/<stem>.safetensors`: two members of one stem would overwrite each other, and an
    out_dir holding a member would overwrite it."""
    from fusion.fuse import align_checkpoints

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref, m1, m2 = tmp_path / "ref.safetensors", tmp_path / "a" / "m.safetensors", tmp_path / "b" / "m.safetensors"
    with pytest.raises(ConfigError, match=r"expected members with distinct file names; got 'm' twice"):
        align_checkpoints("weight_matching", ref, [m1, m2], tmp_path / "out", source="torchvision:resnet18")
    with pytest.raises(ConfigError, match=r"expected an out_dir that holds none of the members; got .* would overwrite"):
        align_checkpoints("weight_matching", ref, [m1], tmp_path / "a", arch="mlp")


def test_a_stateful_module_without_parameters_called_twice_keeps_its_spaces_fixed():
    """BatchNorm(affine=False) has no parameters but running statistics: reused on two spaces, its buffers
    would need two permutations at once."""
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)
            self.bn = torch.nn.BatchNorm1d(6, affine=False)

        def forward(self, x):
            return self.c(self.bn(self.b(self.bn(self.a(x)))))

    torch.manual_seed(0)
    model = Twice()
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(6))
        model.bn.running_var.copy_(torch.rand(6) + 0.5)
    spec = fx_spec(model, torch.zeros(1, 4))
    owners = [name for name, refs in spec.perms.items() if any(r.key == "bn.running_mean" for r in refs)]
    assert len(owners) <= 1, owners
    assert _permuted_outputs_match(model, torch.randn(8, 4)) < 1e-5
