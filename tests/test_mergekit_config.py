"""mergekit YAML configs without mergekit: the parser's refusals, settings (gradients, filters, precedence),
the mergekit-convention kernel options, and `fusion merge --config` on plain HF-style directories.

Parity against mergekit itself is in tests/test_mergekit_parity.py (it needs mergekit in a side venv).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusion.cli import main
from fusion.errors import ConfigError
from fusion.merge import kernels as K
from fusion.merge.mergekit_config import evaluate_setting, layer_positions, load_config, parse_config, run_plan


@pytest.fixture
def dirs(tmp_path):
    """base + 3 fine-tunes as HF-style directories (model.safetensors + config.json), 2 layers."""
    g = torch.Generator().manual_seed(0)
    keys = {"embed.weight": (8, 4), "layers.0.w": (4, 4), "layers.1.w": (4, 4), "layers.1.bias": (4,), "norm.weight": (4,)}
    base = {k: torch.randn(s, generator=g) for k, s in keys.items()}
    base["layers.1.bias"] = torch.zeros(4)
    out = {}
    for name in ("base", "a", "b", "c"):
        d = tmp_path / name
        d.mkdir()
        sd = base if name == "base" else {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "torch_dtype": "float32"}))
        out[name] = d
    (out["base"] / "tokenizer.json").write_text("{}")
    return out


def cfg(dirs, method="ties", **extra):
    data = {"merge_method": method, "base_model": str(dirs["base"]),
            "models": [{"model": str(dirs[n]), "parameters": {"weight": 1.0}} for n in ("a", "b", "c")]}
    data.update(extra)
    return data


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.update(merge_method="della"), "merge_method"),
    (lambda d: d.update(merge_method="nope"), "merge_method"),
    (lambda d: d.update(modules={"text": {}}), "modules"),
    (lambda d: d.update(tokenizer_source="union"), "tokenizer_source"),
    (lambda d: d.update(chat_template="chatml"), "chat_template"),
    (lambda d: d.update(weigth=1), "weigth"),  # a typo mergekit would ignore silently
    (lambda d: d["models"][0]["parameters"].update(weigth=1.0), "weigth"),
    (lambda d: d.update(parameters={"epsilon": 0.1}), "epsilon"),  # della's, not ties'
    (lambda d: d.update(dtype="int4"), "dtype"),
    (lambda d: d.update(base_model="org/some-hub-model"), "base_model"),
    (lambda d: d["models"][1].update(model=d["models"][1]["model"] + "+lora"), "models[1].model"),
    (lambda d: d.update(slices=[{"sources": []}]), "models' or 'slices"),
    (lambda d: d["models"][0].update(parameters={"weight": {"nested": 1}}), "models.0.parameters.weight"),
])
def test_refusals_name_the_key(dirs, mutate, key):
    data = cfg(dirs)
    mutate(data)
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert key in str(e.value)


def test_refusals_of_counts_and_slices(dirs):
    with pytest.raises(ConfigError, match="base_model.*expected a base model"):
        parse_config({k: v for k, v in cfg(dirs).items() if k != "base_model"})
    slerp = cfg(dirs, "slerp", parameters={"t": 0.5})
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.*slerp' expected parameters from \[\]; got unsupported \['weight'\]"):
        parse_config(slerp)  # t is shared in mergekit: a per-model t would be ignored there, so it is refused here
    for m in slerp["models"]:
        del m["parameters"]
    with pytest.raises(ConfigError, match="slerp' expected exactly 1 models"):
        parse_config(slerp)
    two_slices = {"merge_method": "linear", "slices": [
        {"sources": [{"model": str(dirs["a"]), "layer_range": [0, 1]}]},
        {"sources": [{"model": str(dirs["b"]), "layer_range": [1, 2]}]}]}
    with pytest.raises(ConfigError, match="slices.*layer stacking"):
        parse_config(two_slices)
    partial = {"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [{"sources": [
        {"model": str(dirs["a"]), "layer_range": [0, 1]}, {"model": str(dirs["b"]), "layer_range": [0, 1]}]}]}
    with pytest.raises(ConfigError, match=r"layer_range.*expected \[0, 2\]"):
        run_plan(parse_config(partial), dirs["a"].parent / "out")


def test_missing_weight_is_named_per_model_and_tensor(dirs):
    data = cfg(dirs)
    del data["models"][2]["parameters"]["weight"]
    plan = parse_config(data)
    with pytest.raises(ConfigError, match=r"expected parameter 'weight' for model '.*c'.*tensor 'layers.0.w'"):
        plan.params_for("layers.0.w", 0.0)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [unclosed\n")
    with pytest.raises(ConfigError, match="expected valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="readable mergekit YAML"):
        load_config(tmp_path / "missing.yml")
    tagged = tmp_path / "tagged.yml"
    tagged.write_text("merge_method: !!python/object/apply:os.system ['true']\n")  # safe_load refuses tags
    with pytest.raises(ConfigError, match="expected valid YAML"):
        load_config(tagged)


def test_gradients_filters_and_precedence_follow_mergekit():
    # gradient [a, b, c] over t: piecewise linear with len-1 segments (mergekit evaluate_setting)
    assert evaluate_setting("x", [0.0, 1.0, 0.0], 0.25, float, "") == pytest.approx(0.5)
    assert evaluate_setting("x", [0.0, 1.0, 0.0], 1.0, float, "") == 0.0
    assert evaluate_setting("x", [0.2, 0.8], 0.5, float, "") == pytest.approx(0.5)
    assert evaluate_setting("x", "1e-3", 0.0, float, "") == pytest.approx(1e-3)  # YAML's string scientific notation
    assert evaluate_setting("x", [True, False], 0.4, bool, "") is True  # discrete: values[int(t·(n−1))]
    from fusion.merge.mergekit_config import ConditionalParameter as C
    setting = [C(filter="mlp", value=0.3), C(value=[0.0, 1.0])]
    assert evaluate_setting("layers.1.mlp.w", setting, 1.0, float, "") == 0.3
    assert evaluate_setting("layers.1.attn.w", setting, 1.0, float, "") == 1.0
    assert evaluate_setting("layers.1.attn.w", [C(filter="mlp", value=0.3)], 1.0, float, "") is None  # falls through
    # layer positions: i / (n − 1) inside the stack, 0 outside
    ts = layer_positions(["embed.weight", "model.layers.0.w", "model.layers.3.w", "lm_head.weight"], 4)
    assert ts == {"embed.weight": 0.0, "model.layers.0.w": 0.0, "model.layers.3.w": 1.0, "lm_head.weight": 0.0}


def test_precedence_model_then_top_level(dirs):
    data = cfg(dirs, parameters={"weight": 0.25, "density": {"value": 0.5, "filter": "layers"}, "lambda": [1.0, 3.0]})
    del data["models"][1]["parameters"]["weight"]
    data["models"][0]["parameters"]["density"] = 0.9
    p = parse_config(data).params_for("layers.1.w", 0.5)
    assert [m["weight"] for m in p.per_model] == [1.0, 0.25, 1.0]
    assert [m["density"] for m in p.per_model] == [0.9, 0.5, 0.5]
    assert p.shared["lambda"] == pytest.approx(2.0)
    assert p.shared["normalize"] is True and p.shared["rescale"] is False  # ties' defaults in mergekit
    assert parse_config(data).params_for("embed.weight", 0.0).per_model[1]["density"] == 1.0  # filter misses: default 1


def test_run_ties_matches_an_independent_reference(dirs, tmp_path):
    """TIES by hand from the paper's steps with mergekit's conventions: per-tensor top-k, weighted sign vote, disjoint mean."""
    data = cfg(dirs, parameters={"density": 0.5, "lambda": 0.7})
    data["models"][0]["parameters"]["weight"] = [0.5, 1.5]
    run_plan(parse_config(data), tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    sds = {n: load_file(str(dirs[n] / "model.safetensors")) for n in ("base", "a", "b", "c")}
    ts = {"embed.weight": 0.0, "layers.0.w": 0.0, "layers.1.w": 1.0, "layers.1.bias": 1.0, "norm.weight": 0.0}
    for key, t in ts.items():
        b = sds["base"][key]
        ws = [0.5 + t, 1.0, 1.0]
        trimmed = []
        for n in ("a", "b", "c"):
            d = (sds[n][key] - b).reshape(-1)
            k = max(1, int(0.5 * d.numel()))
            keep = torch.zeros_like(d, dtype=torch.bool)
            keep[d.abs().argsort(descending=True)[:k]] = True
            trimmed.append(torch.where(keep, d, 0.0))
        vote = sum(w * d for w, d in zip(ws, trimmed))
        sign = torch.where(vote >= 0, 1.0, -1.0)
        num = sum(w * d * (torch.sign(d) == sign) for w, d in zip(ws, trimmed))
        den = sum(w * (torch.sign(d) == sign).float() for w, d in zip(ws, trimmed))
        want = b.reshape(-1) + 0.7 * num / torch.where(den == 0, 1.0, den)
        torch.testing.assert_close(got[key].reshape(-1), want, rtol=0, atol=1e-6)


def test_cli_config(dirs, tmp_path, capsys):
    yml = tmp_path / "merge.yml"
    yml.write_text(f"merge_method: linear\nmodels:\n  - model: {dirs['a']}\n    parameters: {{weight: 1}}\n"
                   f"  - model: {dirs['b']}\n    parameters: {{weight: 3}}\nout_dtype: bfloat16\n")
    out = tmp_path / "merged"
    assert main(["merge", "--config", str(yml), "--out", str(out)]) == 0
    got = load_file(str(out / "model.safetensors"))
    a, b = (load_file(str(dirs[n] / "model.safetensors")) for n in ("a", "b"))
    for key in a:
        assert got[key].dtype == torch.bfloat16
        torch.testing.assert_close(got[key], ((a[key] + 3 * b[key]) / 4).to(torch.bfloat16), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "mergekit_config.yml").read_text() == yml.read_text()
    assert main(["merge", "--config", str(yml), "--method", "ties", "--out", str(tmp_path / "x")]) == 2
    assert "expected none of ['--method']" in capsys.readouterr().err
    assert main(["merge", "--out", str(tmp_path / "y")]) == 2
    assert "expected --method and --models (or --config merge.yml)" in capsys.readouterr().err


# -- the kernel options that reproduce mergekit --------------------------------------------------


def test_linear_without_normalize_is_the_weighted_sum():
    xs = [torch.randn(5, 3), torch.randn(5, 3)]
    torch.testing.assert_close(K.linear_kernel(xs, [2.0, 2.0], normalize=False), 2 * xs[0] + 2 * xs[1])
    torch.testing.assert_close(K.linear_kernel(xs, [2.0, 2.0]), (xs[0] + xs[1]) / 2)  # default unchanged


def test_rescale_l1_matches_the_norm():
    d = torch.tensor([1.0, -2.0, 3.0, -4.0])
    kept = torch.tensor([0.0, -2.0, 0.0, -4.0])
    torch.testing.assert_close(K.rescale_l1(d, kept), kept * (10.0 / 6.0))
    torch.testing.assert_close(K.rescale_l1(torch.zeros(3), torch.zeros(3)), torch.zeros(3))


def test_slerp_zero_norm_unit_is_mergekits_quarter_circle():
    a, b = torch.zeros(6), torch.randn(6)
    t = 0.3
    torch.testing.assert_close(K.slerp_kernel(a, b, t), t * b)  # our default: lerp
    torch.testing.assert_close(K.slerp_kernel(a, b, t, zero_norm="unit"), math.sin(t * math.pi / 2) * b)


def test_model_stock_mergekit_convention_keeps_negative_cosines():
    base = torch.zeros(4)
    xs = [torch.tensor([1.0, 0, 0, 0]), torch.tensor([-1.0, 0.2, 0, 0]), torch.tensor([0.0, 1.0, 0, 0])]
    deltas = K.task_vectors(xs, base)
    flat = [d / d.norm() for d in deltas]
    cos = (float(flat[0] @ flat[1]) + float(flat[0] @ flat[2]) + float(flat[1] @ flat[2])) / 3
    assert cos < 0
    assert K.model_stock_ratio(deltas) == 0.0  # clamped: keeps the base
    assert K.model_stock_ratio(deltas, convention="mergekit") == pytest.approx(3 * cos / (1 + 2 * cos))
    orth = [torch.tensor([1.0, 0]), torch.tensor([-1.0, 0])]  # N = 2, cos = −1: 1 + cos = 0, singular
    assert K.model_stock_ratio(orth, convention="mergekit") == 0.0


def test_tokenizer_source_needs_one_vocabulary(dirs):
    for n in ("a", "b", "c"):
        (dirs[n] / "tokenizer.json").write_text("{}")
    assert parse_config(cfg(dirs, tokenizer_source="base")).tokenizer_donor == dirs["base"]
    (dirs["b"] / "tokenizer.json").write_text('{"model": {"vocab": {"x": 0}}}')
    with pytest.raises(ConfigError, match=r"tokenizer_source.*different 'tokenizer.json' in .*b"):
        parse_config(cfg(dirs, tokenizer_source="base"))


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_below_density_one_follows_mergekits_rescale(dirs, tmp_path, rescale):
    """density < 1 draws a random mask (ours is seeded); rescale: true matches the L1 norm of the task vector
    (mergekit), false keeps the surviving entries as they are, not DARE's 1/density."""
    data = {"merge_method": "dare_linear", "base_model": str(dirs["base"]),
            "models": [{"model": str(dirs["a"]), "parameters": {"weight": 1.0, "density": 0.5}}],
            "parameters": {"rescale": rescale}}
    run_plan(parse_config(data), tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    base, a = (load_file(str(dirs[n] / "model.safetensors")) for n in ("base", "a"))
    key = "embed.weight"
    tau, kept = a[key] - base[key], got[key] - base[key]
    zero = kept.abs() < 1e-7
    assert 0 < int(zero.sum()) < tau.numel()  # some dropped, some kept
    if rescale:
        assert float(kept.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    else:
        torch.testing.assert_close(kept[~zero], tau[~zero], rtol=0, atol=1e-6)


def test_sharded_inputs_and_outputs_give_the_same_merge(dirs, tmp_path):
    """Inputs as shards + index, output in shards of at most 200 bytes: the same tensors as single files."""
    from fusion.merge.checkpoints import CheckpointWriter, open_checkpoint

    sharded = {}
    for name, d in dirs.items():
        src = open_checkpoint(d)
        out = tmp_path / "sharded" / name
        with CheckpointWriter(out, [(k, *src.layout[k]) for k in src.keys()], as_dir=True, max_shard_bytes=200,
                              companions_from=d) as w:
            for k in src.keys():
                w.write(k, src.get(k))
        assert (out / "model.safetensors.index.json").is_file()
        sharded[name] = out
    data = cfg(dirs, "task_arithmetic", parameters={"lambda": [0.5, 1.0]})
    run_plan(parse_config(data), tmp_path / "single")
    data = cfg(sharded, "task_arithmetic", parameters={"lambda": [0.5, 1.0]})
    res = run_plan(parse_config(data), tmp_path / "multi", max_shard_bytes="200B")
    assert len(res["files"]) > 1
    want = load_file(str(tmp_path / "single" / "model.safetensors"))
    got = open_checkpoint(tmp_path / "multi")
    assert sorted(got.keys()) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got.get(k), v), k


def test_relative_model_paths_resolve_against_the_config_file(dirs, tmp_path, monkeypatch):
    yml = tmp_path / "merge.yml"  # dirs live next to it: base/, a/, b/, c/
    yml.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                   + "".join(f"  - model: {n}\n    parameters: {{weight: 0.5}}\n" for n in ("a", "b")))
    monkeypatch.chdir(tmp_path.parent)  # mergekit resolves against the working directory; the config's also works
    plan = load_config(yml)
    assert plan.base == tmp_path / "base" and [m.path for m in plan.models] == [tmp_path / "a", tmp_path / "b"]
    assert plan.source == yml.read_text()


def test_a_failure_after_the_weights_leaves_no_partial_output(dirs, tmp_path, monkeypatch):
    """The donor's tokenizer files and mergekit_config.yml are part of the output: written before the rename,
    so a failure writing them leaves no half-made directory behind."""
    from pathlib import Path

    real = Path.write_text

    def failing(self, *args, **kwargs):
        if self.name == "mergekit_config.yml":
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError):
        run_plan(parse_config(cfg(dirs), source="merge_method: ties\n"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
