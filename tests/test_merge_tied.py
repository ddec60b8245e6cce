"""Tied weights (one tensor under two names) through loading and the data-aware merges.

safetensors' `save_model` and transformers' `save_pretrained` write a tied tensor once, under one of its names;
loading, Fisher and RegMean must take such a file and give statistics under the name the file keeps."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file, save_model  # noqa: E402
from torch import nn  # noqa: E402

from fusion.data import load  # noqa: E402
from fusion.fuse import data_inputs  # noqa: E402
from fusion.merge import merge, regmean_grams  # noqa: E402
from fusion.sources import complete_tied, load_weights, tied_groups  # noqa: E402


class Tied(nn.Module):
    """Two heads that are one weight (`head_b.weight` is `head_a.weight`), used on different inputs."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(64, 16)
        self.mid = nn.Linear(16, 16)
        self.head_a = nn.Linear(16, 10, bias=False)
        self.head_b = nn.Linear(16, 10, bias=False)
        self.head_b.weight = self.head_a.weight

    def forward(self, x):
        h = torch.relu(self.enc(x))
        return self.head_a(h) + self.head_b(torch.tanh(self.mid(h)))


def _saved(seed: int, tmp_path, keep: str) -> dict:
    """A member's file: save_model's (keeps `head_a.weight`), one keeping `head_b.weight` instead, or one
    keeping both names, each its own copy (what `fusion convert-weights` writes from a torch checkpoint)."""
    torch.manual_seed(seed)
    model = Tied()
    path = tmp_path / f"m{seed}_{keep}.safetensors"
    if keep == "head_a":
        save_model(model, str(path))
    elif keep == "both":
        save_file({k: v.clone() for k, v in model.state_dict().items()}, str(path))
    else:
        state = {k: v.clone() for k, v in model.state_dict().items() if k != "head_a.weight"}
        save_file(state, str(path))
    return load_file(str(path))


def test_tied_groups_and_loading_a_file_that_keeps_one_name(tmp_path):
    assert tied_groups(Tied().state_dict()) == [["head_a.weight", "head_b.weight"]]
    for keep in ("head_a", "head_b"):
        saved = _saved(0, tmp_path, keep)
        assert f"{keep}.weight" in saved and len(saved) == len(Tied().state_dict()) - 1
        torch.manual_seed(9)
        model = load_weights(Tied(), tmp_path / f"m0_{keep}.safetensors")
        assert model.head_a.weight is model.head_b.weight  # still tied
        torch.testing.assert_close(model.head_a.weight, saved[f"{keep}.weight"], rtol=0, atol=0)
        full = complete_tied(Tied().state_dict(), saved)
        assert set(full) == set(Tied().state_dict()) and full["head_a.weight"] is full["head_b.weight"]


def test_complete_tied_leaves_untied_entries_and_missing_groups_alone():
    state = Tied().state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("head_")}
    assert set(complete_tied(state, partial)) == set(partial)  # no name of the group present: nothing to copy
    plain = nn.Linear(3, 2).state_dict()
    assert tied_groups(plain) == [] and complete_tied(plain, {"weight": plain["weight"]}) == {"weight": plain["weight"]}


def test_regmean_gram_of_a_tied_weight_sums_its_uses():
    """One Gram for the tied weight: (X_aᵀX_a + X_bᵀX_b) / (n_a + n_b), the inputs of its two layers computed directly."""
    torch.manual_seed(1)
    model = Tied().eval()
    X = torch.randn(40, 64)
    grams = regmean_grams(model, X)
    assert "head_b.weight" not in grams and set(grams) == {"enc.weight", "mid.weight", "head_a.weight"}
    with torch.no_grad():
        xa = torch.relu(model.enc(X)).double()
        xb = torch.tanh(model.mid(xa.float())).double()
    torch.testing.assert_close(grams["head_a.weight"], (xa.T @ xa + xb.T @ xb) / 80)
    torch.testing.assert_close(grams["mid.weight"], xa.T @ xa / 40)


@pytest.mark.parametrize("keep", ["head_a", "head_b", "both"])
@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_data_aware_merges_take_tied_members_under_the_names_their_files_keep(tmp_path, keep, method):
    data = load("digits")
    members = [_saved(seed, tmp_path, keep) for seed in (0, 1)]
    torch.manual_seed(5)
    extra = data_inputs(method, members, Tied(), data)
    key = "fishers" if method == "fisher" else "grams"
    kept = ["head_a", "head_b"] if keep == "both" else [keep]
    for stats, sd in zip(extra[key], members):
        assert set(stats) <= set(sd) and all(f"{k}.weight" in stats for k in kept)
    merged = merge(method, members, **{key: extra[key]})
    assert set(merged) == set(members[0])
    # every kept name of the one tensor got the data-aware merge, not the plain mean
    mean = (members[0][f"{kept[0]}.weight"] + members[1][f"{kept[0]}.weight"]) / 2
    for k in kept:
        torch.testing.assert_close(merged[f"{k}.weight"], merged[f"{kept[0]}.weight"], rtol=0, atol=0)
    assert not torch.allclose(merged[f"{kept[0]}.weight"].float(), mean.float(), atol=1e-4)
    if keep == "both":
        return
    # the merged file loads back as a tied model whose heads are the merged tensor
    path = tmp_path / "merged.safetensors"
    save_file({k: v.contiguous() for k, v in merged.items()}, str(path))
    model = load_weights(Tied(), path)
    torch.testing.assert_close(model.head_b.weight, merged[f"{keep}.weight"].float(), rtol=0, atol=0)


def test_two_statistics_for_one_tied_tensor_are_refused_not_one_dropped():
    """Two Parameters over one storage get a statistic each (they are two parameters to torch): which one the
    merge should use is not knowable, so it says so."""
    from fusion.errors import ConfigError
    from fusion.fuse import _under_saved_names

    shared = torch.zeros(3, 2)
    module_state = {"a.weight": shared, "b.weight": shared}
    with pytest.raises(ConfigError, match=r"tied weights \['a.weight', 'b.weight'\]: expected one statistic"):
        _under_saved_names({"a.weight": torch.ones(3, 2), "b.weight": torch.ones(3, 2)}, {"a.weight": shared}, module_state, "")
    got = _under_saved_names({"a.weight": torch.ones(3, 2)}, {"b.weight": shared}, module_state, "")
    assert set(got) == {"b.weight"}
