"""Architecture-free merging and Hugging Face directories in and out (issue 16, parts 1 and 2).

References are independent of the code under test: state dicts loaded with `safetensors.torch.load_file`,
merged in memory with `fusion.merge.merge`; shards split by huggingface_hub's own
`split_torch_state_dict_into_shards`; merged directories loaded by transformers' `from_pretrained`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusion.cli import main
from fusion.errors import ConfigError
from fusion.fuse import merge_checkpoints
from fusion.merge import MERGE_METHODS, merge, merge_files, streamable_methods
from fusion.merge.checkpoints import open_checkpoint, parse_size, plan_shards, shard_names

CASES = [  # (method, params): every weight-only (streamable) method
    ("linear", {}),
    ("uniform_soup", {}),
    ("task_arithmetic", {"scaling": 0.7}),
    ("ties", {"density": 0.4}),
    ("ties", {"density": 0.4, "scope": "global"}),
    ("dare_linear", {"density": 0.6, "seed": 3}),
    ("dare_ties", {"density": 0.6, "seed": 3}),
    ("slerp", {"t": 0.3}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
    ("model_stock", {}),
]


def _plain_state(seed: int) -> dict[str, torch.Tensor]:
    """A state dict of no zoo architecture: odd names and shapes, a 0-d entry and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.embed.weight": torch.randn(50, 12, generator=g),
        "encoder.block.0.attn.qkv": torch.randn(36, 12, generator=g),
        "encoder.block.0.scale": torch.randn((), generator=g),
        "head.bias": torch.randn(7, generator=g),
        "head.conv": torch.randn(4, 3, 3, 3, generator=g),
        "step": torch.tensor([seed], dtype=torch.int64),
    }


def _family(tmp_path: Path):
    base = _plain_state(100)
    members = [{k: (v + 0.1 * _plain_state(i)[k] if v.is_floating_point() else _plain_state(i)[k]) for k, v in base.items()} for i in range(3)]
    paths = []
    for i, m in enumerate(members):
        paths.append(tmp_path / f"ft{i}.safetensors")
        save_file(m, str(paths[-1]))
    save_file(base, str(tmp_path / "base.safetensors"))
    return paths, tmp_path / "base.safetensors"


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_arch_free_merge_of_plain_state_dicts_equals_in_memory(tmp_path, name, params):
    assert {n for n, _ in CASES} == set(streamable_methods())
    paths, base_path = _family(tmp_path)
    cls = MERGE_METHODS[name]
    n = cls.max_models or 3
    base = base_path if cls.needs_base else None
    out = tmp_path / "merged.safetensors"
    res = merge_checkpoints(name, paths[:n], out, base=base, params=params)  # no spec, no arch
    assert res["arch_free"] and res["streamed"] and res["metrics"] == {}
    expected = merge(name, [load_file(str(p)) for p in paths[:n]], base=load_file(str(base)) if base else None, **params)
    got = load_file(str(out))
    assert set(got) == set(expected) and not out.with_suffix(".json").exists()
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k


def test_cli_merges_plain_files_without_arch(tmp_path, capsys):
    paths, base_path = _family(tmp_path)
    out = tmp_path / "ta.safetensors"
    code = main(["merge", "--method", "task_arithmetic", "--models", *map(str, paths), "--base", str(base_path),
                 "--weights", "1,2,1", "--param", "scaling=0.5", "--out", str(out)])  # --data defaults to digits: not needed here
    assert code == 0, capsys.readouterr().err
    assert "architecture-free" in capsys.readouterr().out
    expected = merge("task_arithmetic", [load_file(str(p)) for p in paths], base=load_file(str(base_path)), weights=[1, 2, 1], scaling=0.5)
    got = load_file(str(out))
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_cli_notes_batchnorm_statistics_merged_without_an_architecture(tmp_path, capsys):
    """A CNN's state dicts merged with no spec and no --arch: its BatchNorm running statistics are averaged like
    weights and nothing recomputes them: the CLI says so, with the way out; a plain MLP gets no note."""
    from safetensors.torch import save_file

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
        paths.append(tmp_path / f"cnn_{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(paths[-1]))
    assert main(["merge", "--method", "linear", "--models", *map(str, paths), "--out", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "note: 2 BatchNorm running statistics (e.g. 1.running_mean) were merged like weights, not recomputed" in out
    assert "torch.optim.swa_utils.update_bn" in out
    plain, _ = _family(tmp_path)
    assert main(["merge", "--method", "linear", "--models", *map(str, plain), "--out", str(tmp_path / "p.safetensors")]) == 0
    assert "BatchNorm" not in capsys.readouterr().out


def test_arch_free_refuses_data_methods_with_a_clear_message(tmp_path):
    paths, _ = _family(tmp_path)
    with pytest.raises(ConfigError, match=r"merge method 'fisher' needs a model to run on data; expected a ft0.json spec .* or --arch; got neither"):
        merge_checkpoints("fisher", paths, tmp_path / "o.safetensors")


def test_mismatch_errors_list_the_first_differences(tmp_path, capsys):
    paths, _ = _family(tmp_path)
    odd = load_file(str(paths[1]))
    del odd["head.bias"]
    odd["head.conv"] = odd["head.conv"][:2].contiguous()
    odd["encoder.embed.weight"] = odd["encoder.embed.weight"].to(torch.float16)
    odd["extra.weight"] = torch.zeros(2)
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ConfigError) as err:
        merge_files("linear", [paths[0], tmp_path / "odd.safetensors"], tmp_path / "o.safetensors")
    msg = str(err.value)
    assert "got 1 missing, 1 extra and 2 changed" in msg
    assert "entry 'head.bias': expected shape (7,) torch.float32; got missing" in msg
    assert "entry 'extra.weight': expected no such entry; got shape (2,) torch.float32" in msg
    assert "entry 'head.conv': expected shape (4, 3, 3, 3) torch.float32; got (2, 3, 3, 3) torch.float32" in msg
    assert "entry 'encoder.embed.weight': expected shape (50, 12) torch.float32; got (50, 12) torch.float16" in msg
    assert not (tmp_path / "o.safetensors").exists()
    code = main(["merge", "--method", "linear", "--models", str(paths[0]), str(tmp_path / "odd.safetensors"), "--out", str(tmp_path / "c.safetensors")])
    err_text = capsys.readouterr().err
    assert code != 0 and "expected the entries, shapes and dtypes" in err_text and "Traceback" not in err_text


def test_per_tensor_params_and_weights_equal_per_entry_merges(tmp_path):
    paths, base_path = _family(tmp_path)

    def params_for(key):
        return {"density": 0.3} if key.startswith("encoder") else {"density": 0.9, "weights": [1.0, 2.0, 0.5]}

    out = tmp_path / "o.safetensors"
    merge_files("ties", paths, out, base_path=base_path, params_for=params_for, density=0.5)
    states, base = [load_file(str(p)) for p in paths], load_file(str(base_path))
    got = load_file(str(out))
    for k in base:
        if not base[k].is_floating_point():
            continue
        p = params_for(k)
        expected = merge("ties", [{k: s[k]} for s in states], base={k: base[k]}, weights=p.pop("weights", None), **p)
        assert torch.equal(got[k], expected[k]), k
    with pytest.raises(ConfigError, match=r"entry '[\w.]+': merge method 'ties': expected density in \(0.0, 1.0\]; got 2.0"):
        merge_files("ties", paths, tmp_path / "x.safetensors", base_path=base_path, params_for=lambda k: {"density": 2.0}, density=0.5)
    assert not (tmp_path / "x.safetensors").exists()  # a failed merge leaves no partial output
    with pytest.raises(ConfigError, match="expected no per-tensor parameters"):
        merge_files("ties", paths, tmp_path / "x.safetensors", base_path=base_path, params_for=params_for, density=0.5, scope="global")


def test_shard_plan_matches_huggingface_hub():
    split_torch_state_dict_into_shards = pytest.importorskip("huggingface_hub").split_torch_state_dict_into_shards

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 400, (60,), generator=g).tolist()
    state = {f"layer.{i}.weight": torch.zeros(n) for i, n in enumerate(sizes)}
    state["huge.weight"] = torch.zeros(2000)  # larger than a shard: a shard of its own
    state["after.weight"] = torch.zeros(3)
    for limit in (1000, 2500, 100_000):
        split = split_torch_state_dict_into_shards(state, max_shard_size=limit)
        shards = plan_shards([(k, v.numel() * 4) for k, v in state.items()], limit)
        names = shard_names(len(shards))
        assert {k: names[i] for i, ks in enumerate(shards) for k in ks} == split.tensor_to_filename
        assert split.metadata["total_size"] == sum(v.numel() * 4 for v in state.values())


def test_parse_size():
    assert parse_size("500MB") == 500 * 10**6 and parse_size("5GB") == 5 * 10**9 and parse_size("1GiB") == 2**30
    assert parse_size("20kb") == 20_000 and parse_size(123) == 123 and parse_size("77") == 77
    for bad in ("lots", "5 parsecs", "-1MB", 0):
        with pytest.raises(ConfigError, match="expected"):
            parse_size(bad)


# ---------------------------------------------------------------------------------------------
# Hugging Face directories

try:
    import transformers
except ImportError:  # the [text] extra: only the tests that build BERT models need it
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed (the [text] extra)")


def _hf_state(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory, read with safetensors' own loader (not open_checkpoint)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def bert_family(tmp_path_factory):
    """A tiny random-init BERT classifier saved sharded as the base, and 3 perturbed 'fine-tunes' saved with
    different shard sizes (one unsharded), so their keys are spread differently across files."""
    root = tmp_path_factory.mktemp("bert")
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]))
    tok = transformers.BertTokenizer(vocab_file=str(root / "vocab.txt"))
    model.save_pretrained(root / "base", max_shard_size="20KB")
    tok.save_pretrained(root / "base")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    members = []
    for i, shard in enumerate(["35KB", "60KB", "10MB"]):
        ft = transformers.BertForSequenceClassification(cfg).eval()
        ft.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base_sd.items()})
        ft.save_pretrained(root / f"ft{i}", max_shard_size=shard)
        tok.save_pretrained(root / f"ft{i}")
        members.append(root / f"ft{i}")
    return root, cfg, members


def _logits(model, seed=0):
    x = torch.randint(0, 99, (4, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits


@needs_transformers
def test_hf_directory_round_trip_sharded_in_sharded_out(bert_family, tmp_path, capsys):
    from huggingface_hub import split_torch_state_dict_into_shards

    root, cfg, members = bert_family
    base = root / "base"
    assert len(list(base.glob("model-*.safetensors"))) > 2 and (members[2] / "model.safetensors").is_file()
    out = tmp_path / "merged"
    code = main(["merge", "--method", "ties", "--models", *map(str, members), "--base", str(base),
                 "--param", "density=0.5", "--max-shard-size", "30KB", "--out", str(out)])
    assert code == 0, capsys.readouterr().err

    expected = merge("ties", [_hf_state(m) for m in members], base=_hf_state(base), density=0.5)
    ref = transformers.BertForSequenceClassification(cfg).eval()
    ref.load_state_dict(expected)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert torch.equal(_logits(loaded), _logits(ref))
    got = _hf_state(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)

    # shards and index as save_pretrained writes them
    index = json.loads((out / "model.safetensors.index.json").read_text())
    order = open_checkpoint(out).keys()
    split = split_torch_state_dict_into_shards({k: expected[k] for k in order}, max_shard_size="30KB")
    assert index["weight_map"] == split.tensor_to_filename and len(split.filename_to_tensors) > 2
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(split.filename_to_tensors)
    data_bytes, count = {}, {}
    for k, e in open_checkpoint(out).entries.items():
        data_bytes[e.file.name] = data_bytes.get(e.file.name, 0) + e.nbytes
        count[e.file.name] = count.get(e.file.name, 0) + 1
    assert all(n <= 30_000 or count[f] == 1 for f, n in data_bytes.items())  # one larger entry gets a shard of its own
    assert sum(data_bytes.values()) == index["metadata"]["total_size"]
    ref_dir = tmp_path / "ref"
    ref.save_pretrained(ref_dir, max_shard_size="30KB")
    ref_index = json.loads((ref_dir / "model.safetensors.index.json").read_text())
    assert index["metadata"] == ref_index["metadata"]  # total_size and total_parameters
    assert set(index["weight_map"]) == set(ref_index["weight_map"])
    # config and tokenizer come from the base
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert not list(tmp_path.glob(".merged.tmp-*"))


@needs_transformers
def test_bf16_directories_round_trip_in_bf16_or_the_dtype_asked(bert_family, tmp_path):
    root, cfg, members = bert_family
    bf = []
    for i, m in enumerate(members):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(m).to(torch.bfloat16)
        model.save_pretrained(tmp_path / f"bf{i}", max_shard_size=["15KB", "40KB", "10MB"][i])
        bf.append(tmp_path / f"bf{i}")
    states = [_hf_state(d) for d in bf]
    assert all(v.dtype == torch.bfloat16 for v in states[0].values() if v.is_floating_point())
    out = tmp_path / "lin"
    summary = merge_files("linear", bf, out, weights=[1, 2, 1], max_shard_bytes="25KB")
    expected = merge("linear", states, weights=[1, 2, 1])  # bf16 accumulated in float32, rounded back once
    got = _hf_state(out)
    assert summary["out_dtype"] is None and len(summary["files"]) > 1
    assert all(got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]) for k in expected)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ref = transformers.BertForSequenceClassification(cfg).eval().to(torch.bfloat16)
    ref.load_state_dict(expected)
    assert torch.equal(_logits(loaded.to(torch.bfloat16)), _logits(ref))

    out32 = tmp_path / "lin32"
    merge_checkpoints("linear", bf, out32, weights=[1, 2, 1], dtype="float32")
    expected32 = merge("linear", [{k: v.float() if v.is_floating_point() else v for k, v in s.items()} for s in states], weights=[1, 2, 1])
    got32 = _hf_state(out32)
    assert all(got32[k].dtype == expected32[k].dtype and torch.equal(got32[k], expected32[k]) for k in expected32)
    config = json.loads((out32 / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert (out32 / "model.safetensors").is_file()  # under the 5GB default: one file, no index
    assert not (out32 / "model.safetensors.index.json").exists()


@needs_transformers
def test_directory_to_single_file_and_output_rules(bert_family, tmp_path):
    root, _, members = bert_family
    single = tmp_path / "one.safetensors"
    merge_checkpoints("linear", members, single)
    expected = merge("linear", [_hf_state(m) for m in members])
    got = load_file(str(single))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="expected a new or empty directory; got an existing directory with files"):
        merge_files("linear", members, taken)
    assert (taken / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="max_shard_bytes applies to a directory output"):
        merge_files("linear", members, tmp_path / "x.safetensors", max_shard_bytes="1MB")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConfigError, match=r"expected model.safetensors or model.safetensors.index.json; got \['pytorch_model.bin'\] \(pickled weights are not read"):
        open_checkpoint(pickled)


@needs_transformers
def test_checkpoint_reads_rows_and_entries_like_safetensors(bert_family):
    _, _, members = bert_family
    ckpt = open_checkpoint(members[0])
    ref = _hf_state(members[0])
    assert ckpt.is_dir and set(ckpt.keys()) == set(ref) and len(ckpt.keys()) == len(ref)
    for k in ckpt.keys():
        assert ckpt.layout[k] == (tuple(ref[k].shape), ref[k].dtype)
        assert torch.equal(ckpt.get(k), ref[k])
        if ref[k].dim():
            assert torch.equal(ckpt.rows(k, 1, 3), ref[k][1:3])
    assert ckpt.nbytes == sum(math.prod(v.shape) * v.element_size() for v in ref.values())


def test_entries_larger_than_a_shard_get_their_own_shard_ahead_of_the_filling_one(tmp_path):
    """huggingface_hub appends an oversize entry as its own shard while the current one keeps filling, so
    shard order is not entry order; the writer follows the shards (regression: it refused the order)."""
    split_torch_state_dict_into_shards = pytest.importorskip("huggingface_hub").split_torch_state_dict_into_shards

    paths, base_path = _family(tmp_path)
    out = tmp_path / "dir"
    merge_files("task_arithmetic", paths, out, base_path=base_path, max_shard_bytes=1000)
    expected = merge("task_arithmetic", [load_file(str(p)) for p in paths], base=load_file(str(base_path)))
    got = _hf_state(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    order = open_checkpoint(paths[0]).keys()
    split = split_torch_state_dict_into_shards({k: expected[k] for k in order}, max_shard_size=1000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == split.tensor_to_filename
    assert index["metadata"] == {"total_size": split.metadata["total_size"]}
    assert not (out / "config.json").exists()  # plain files: no config to copy


@pytest.mark.parametrize("name, params, weights", [("linear", {}, [1.0, 2.0, 0.5]), ("uniform_soup", {}, None),
                                                     ("task_arithmetic", {"scaling": 0.3}, [0.5, 1.0, 2.0])])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_slices_merged_in_small_blocks_equal_in_memory(tmp_path, monkeypatch, name, params, weights, dtype):
    """Half-precision row slices are widened and merged a few elements at a time (merge_blocked): same bits."""
    import fusion.merge.streaming as streaming

    monkeypatch.setattr(streaming, "SUB_BLOCK", 7)  # and fp32 inputs go through the same blocks
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _plain_state(100).items()}
    members = [{k: (v + 0.1 * _plain_state(i)[k].to(dtype) if v.is_floating_point() else v) for k, v in base.items()} for i in range(3)]
    paths = []
    for i, m in enumerate(members):
        paths.append(tmp_path / f"h{i}.safetensors")
        save_file(m, str(paths[-1]))
    save_file(base, str(tmp_path / "hb.safetensors"))
    cls = MERGE_METHODS[name]
    out = tmp_path / "o.safetensors"
    merge_files(name, paths, out, base_path=tmp_path / "hb.safetensors" if cls.needs_base else None, weights=weights,
                chunk_bytes=100, **params)
    expected = merge(name, members, base=base if cls.needs_base else None, weights=weights, **params)
    got = load_file(str(out))
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k


def test_sharded_bench_smoke_reports_both_ratios_and_cleans_up(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("huggingface_hub")  # the benchmark writes its inputs with save_torch_state_dict
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "bench.bench_merge_sharded", "--smoke", "--dir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["streaming_equals_in_memory"] is True
    assert result["same_bytes_as_torch_path"] is True  # fused loop + mapped reads wrote what the torch path wrote
    assert result["compute_gbps_input"] > 0 and result["write_gbps_output"] > 0 and result["torch_path_stream_gbps_input"] > 0
    assert result["output_shards"] > 1 and result["input_shards"][0] != result["input_shards"][1]
    assert result["throughput_ratio"] > 0 and result["rss_over_largest_shard"] > 0
    assert result["stream_peak_rss_bytes"] >= result["baseline_rss_bytes"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the synthetic checkpoints are deleted


def test_writer_takes_entries_in_any_order_and_refuses_wrong_sizes(tmp_path):
    """Callers writing in entry order (fusion merge --config) meet shards out of entry order when an entry
    is larger than a shard; each entry's bytes go to its own offset, so any order works."""
    from fusion.merge.checkpoints import CheckpointWriter

    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(10, generator=g), "huge": torch.randn(100, generator=g), "b": torch.randn(3, 4, generator=g),
             "c": torch.arange(5)}
    entries = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    with CheckpointWriter(tmp_path / "d", entries, as_dir=True, max_shard_bytes=100) as w:
        assert w.order[0] == "huge" and len(w.shards) == 3
        w.write("c", state["c"])
        w.write("a", state["a"])
        w.write("b", state["b"][:1])  # rows of one entry, in order
        w.write("b", state["b"][1:])
        w.write("huge", state["huge"])
    got = open_checkpoint(tmp_path / "d")
    assert all(torch.equal(got.get(k), v) for k, v in state.items())
    with pytest.raises(RuntimeError, match="entry 'a': expected 40 bytes; got 80"):
        with CheckpointWriter(tmp_path / "e", entries, as_dir=True, max_shard_bytes=100) as w:
            w.write("a", torch.cat([state["a"], state["a"]]))
    with pytest.raises(RuntimeError, match="expected 528 data bytes; wrote 40"):
        with CheckpointWriter(tmp_path / "f.safetensors", entries, as_dir=False) as w:
            w.write("a", state["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # failed writes leave nothing behind


def test_writer_places_pieces_at_offsets_from_several_threads(tmp_path):
    """write_at: pieces of one entry in any order, from threads at once, give the bytes sequential writes give;
    the shard closes with its last byte; pieces outside the entry and appends after offsets are refused."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from fusion.merge.checkpoints import CheckpointWriter

    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(64, 33, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g), "i": torch.arange(4)}
    entries = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    flat = state["w"].reshape(-1)
    pieces = [(s, flat[s:s + 100]) for s in range(0, flat.numel(), 100)]
    random.Random(0).shuffle(pieces)
    with CheckpointWriter(tmp_path / "seq.safetensors", entries, as_dir=False) as w:
        for k, v in state.items():
            w.write(k, v)
    with CheckpointWriter(tmp_path / "at", entries, as_dir=True, max_shard_bytes=4230) as w:
        assert len(w.shards) == 2 and w.shard_of["w"] == 0
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: w.write_at("w", 2 * p[0], p[1]), pieces))
        assert 0 in w.closed  # every byte of the shard is in: closed, as `write` closes it
        w.write("b", state["b"])
        w.write_at("i", 16, state["i"][2:])
        w.write_at("i", 0, state["i"][:2])
    got, seq = open_checkpoint(tmp_path / "at"), open_checkpoint(tmp_path / "seq.safetensors")
    assert all(torch.equal(got.get(k), v) and torch.equal(seq.get(k), v) for k, v in state.items())
    with pytest.raises(RuntimeError, match=r"entry 'b': expected bytes within \[0, 28\); got \[24, 32\)"):
        with CheckpointWriter(tmp_path / "x", entries, as_dir=True) as w:
            w.write_at("b", 24, state["b"][:2])
    with pytest.raises(RuntimeError, match=r"entry 'b': expected 28 bytes in all; got 32 \(a piece written twice\)"):
        with CheckpointWriter(tmp_path / "z", entries, as_dir=True) as w:
            w.write_at("b", 0, state["b"][:4])
            w.write_at("b", 12, state["b"][3:])
            w.write_at("b", 0, state["b"][:1])
    with pytest.raises(RuntimeError, match="entry 'b': written at offsets before; got an append"):
        with CheckpointWriter(tmp_path / "y", entries, as_dir=True) as w:
            w.write_at("b", 0, state["b"][:2])
            w.write("b", state["b"][2:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["at", "seq.safetensors"]


def test_reserve_allocates_the_file_or_says_it_could_not(tmp_path, monkeypatch):
    """fallocate(2) gives the file its size up front (where the filesystem has it); a failure is False, never zeros written."""
    import os

    from fusion.merge import checkpoints

    with open(tmp_path / "r.bin", "wb") as f:
        ok = checkpoints.reserve(f.fileno(), 1 << 20)
    assert (tmp_path / "r.bin").stat().st_size == (1 << 20 if ok else 0)

    monkeypatch.setattr(checkpoints, "_fallocate", lambda *args: -1)  # as libc answers EOPNOTSUPP
    with open(tmp_path / "n.bin", "wb") as f:
        assert checkpoints.reserve(f.fileno(), 1 << 20) is False
    assert os.path.getsize(tmp_path / "n.bin") == 0


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file written byte by byte (its header as given, however wrong)."""
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header, match", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, r"entry 'w': expected integer data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, r"entry 'w': expected integer data_offsets"),
    ({"w": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, r"entry 'w': expected a shape of non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": ["x"]}, r"expected '__metadata__' to be a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, r"expected 8 bytes inside the file"),
    ({"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, r"entry 'w': expected a dtype in"),
])
def test_untrusted_headers_are_refused_with_a_config_error(tmp_path, header, match):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, bytes(8))
    with pytest.raises(ConfigError, match=match):
        open_checkpoint(path)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../model.safetensors", ".."])
def test_index_shard_names_outside_the_directory_are_refused(tmp_path, name):
    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.zeros(2)}, str(outside))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"w": name}}))
    with pytest.raises(ConfigError, match="expected shard"):
        open_checkpoint(model)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_a_pickled_file_given_directly_is_refused_unread(tmp_path, name):
    """A pickle is never opened: the error names the fix, as for a directory holding only pytorch_model.bin."""
    path = tmp_path / name
    path.write_bytes(b"\x80\x02}q\x00.")  # a pickle's first bytes: would read as a huge header length
    with pytest.raises(ConfigError, match=r"expected a \.safetensors file; got .*\(pickled weights are not read"):
        open_checkpoint(path)


def test_a_safetensors_out_that_is_an_existing_directory_is_refused(tmp_path):
    paths, _ = _family(tmp_path)
    out = tmp_path / "out.safetensors"
    out.mkdir()
    with pytest.raises(ConfigError, match=r"expected a new \.safetensors file path; got an existing directory"):
        merge_files("linear", paths, out)
    assert out.is_dir() and not any(out.iterdir())
