"""`fusion merge --config` equals `mergekit-yaml` on the same YAML, within 1e-6, on tiny random-init
LlamaForCausalLM, BertForSequenceClassification and ViTForImageClassification checkpoints.

mergekit is a test-only dependency, run in its own venv (artifacts/mergekit-venv, cached between runs):
a `.pth` file makes our .venv's packages (torch, transformers, pydantic, ...) visible to it, and only
mergekit and the few small packages it lacks are installed there with `--no-deps`, so no CUDA torch is
downloaded and .venv's pins are untouched. No network or a failed install skips with pip's reason.

Determinism: DARE draws a random mask (torch's global RNG in mergekit, our seeded generator here), so
dare_linear / dare_ties are compared at density 1, where DARE is deterministic. Breadcrumbs and TIES
trim by sorting magnitudes and are deterministic at any density (ties between equal magnitudes do not
occur in random float data).

mergekit's architecture inference keeps no encoder layers of ViT (its output has only the embeddings,
final norm and classifier), so ViT is compared on the tensors mergekit writes; Llama and BERT on all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "artifacts" / "mergekit-venv"
PINS = ("mergekit==0.1.5", "immutables==0.21", "peft==0.21.2", "accelerate==1.16.0")
READY = VENV / ".fusion-ready"
ATOL = 1e-6

DRIVER = """
import json, sys
from mergekit.scripts.run_yaml import main  # the mergekit-yaml command
for cfg, out in json.loads(sys.argv[1]):
    main([cfg, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--random-seed", "0"], standalone_mode=False)
"""


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@pytest.fixture(scope="session")
def mergekit_python() -> Path:
    """The side venv's interpreter with mergekit importable; built once (a few MB), skipped when it cannot be."""
    if READY.is_file() and READY.read_text() == "\n".join(PINS) and _venv_python().is_file():
        return _venv_python()
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, capture_output=True, timeout=300)
        site = Path(subprocess.run([str(_venv_python()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True, timeout=60).stdout.strip())
        (site / "fusion_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        pip = subprocess.run([str(_venv_python()), "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check", *PINS],
                             capture_output=True, text=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"could not create the mergekit venv at {VENV}: {exc}")
    if pip.returncode != 0:
        pytest.skip(f"pip could not install {' '.join(PINS)} (offline?): {(pip.stderr or pip.stdout).strip().splitlines()[-1:]}")
    check = subprocess.run([str(_venv_python()), "-c", "import mergekit.scripts.run_yaml"], capture_output=True, text=True, timeout=300)
    if check.returncode != 0:
        pytest.skip(f"mergekit installed but does not import next to our pins: {check.stderr.strip().splitlines()[-1:]}")
    READY.write_text("\n".join(PINS))
    return _venv_python()


def _tiny(kind: str):
    from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, ViTConfig,
                              ViTForImageClassification)

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, num_key_value_heads=2, max_position_embeddings=64,
                                            tie_word_embeddings=False, **common))
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(vocab_size=64, max_position_embeddings=64, num_labels=3, **common))
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=3, **common))


def _configs(root: Path) -> dict[str, dict]:
    """method -> mergekit config over root/{base, ft0, ft1, ft2}; one gradient list per GTA config."""
    m = [str(root / f"ft{i}") for i in range(3)]
    base = str(root / "base")
    three = lambda params: [{"model": p, "parameters": q} for p, q in zip(m, params)]  # noqa: E731
    return {
        "linear": {"merge_method": "linear", "models": three([{"weight": 0.5}, {"weight": 0.3}, {"weight": [0.1, 0.6]}])},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                            "models": three([{"weight": 0.5}, {"weight": [0.2, 0.9]}, {"weight": 0.3}]), "parameters": {"lambda": 0.8}},
        "ties": {"merge_method": "ties", "base_model": base,
                 "models": [{"model": base}] + three([{"weight": [0.2, 0.8], "density": 0.5}, {"weight": 0.7, "density": 0.4},
                                                       {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}], "density": 0.6}]),
                 "parameters": {"normalize": True, "int8_mask": True}},
        "dare_linear": {"merge_method": "dare_linear", "base_model": base,
                        "models": three([{"weight": 0.4}, {"weight": 0.4}, {"weight": 0.2}]), "parameters": {"density": 1.0, "normalize": True}},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base,
                      "models": three([{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.5}]), "parameters": {"density": 1.0}},
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": m[0]}],
                  "parameters": {"t": [{"filter": "attn", "value": [0.0, 0.7]}, {"value": 0.4}]}},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base,
                        "models": three([{"weight": 1.0, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.7},
                                         {"weight": 0.5, "density": 0.9, "gamma": 0.2}])},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base,
                             "models": three([{"weight": 1.0}, {"weight": 0.6}, {"weight": 0.4}]),
                             "parameters": {"density": 0.7, "gamma": 0.05, "normalize": True, "rescale": True}},  # L1 rescale
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": [{"model": p} for p in m]},
    }


ARCHS = ("llama", "bert", "vit")
METHODS = tuple(_configs(Path(".")))


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory, mergekit_python):
    """Tiny checkpoints (base + 3 perturbed fine-tunes per architecture), every config, and mergekit's outputs."""
    import yaml

    root = tmp_path_factory.mktemp("mergekit")
    jobs, configs = [], {}
    for kind in ARCHS:
        torch.manual_seed(0)
        model = _tiny(kind)
        model.save_pretrained(root / kind / "base")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for i in range(3):
            g = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(state[name] + 0.02 * torch.randn(p.shape, generator=g))
            model.save_pretrained(root / kind / f"ft{i}")
        for method, data in _configs(root / kind).items():
            path = root / "configs" / f"{kind}-{method}.yml"
            path.parent.mkdir(exist_ok=True)
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            configs[kind, method] = path
            jobs.append([str(path), str(root / "mergekit" / f"{kind}-{method}")])
    run = subprocess.run([str(mergekit_python), "-c", DRIVER, json.dumps(jobs)], capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert run.returncode == 0, f"mergekit-yaml failed: {run.stderr[-3000:]}"
    return root, configs


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_parity_with_mergekit(mergekit_outputs, kind, method, tmp_path):
    from fusion.cli import main

    root, configs = mergekit_outputs
    out = tmp_path / "ours"
    assert main(["merge", "--config", str(configs[kind, method]), "--out", str(out)]) == 0
    ours = load_file(str(out / "model.safetensors"))
    theirs = load_file(str(root / "mergekit" / f"{kind}-{method}" / "model.safetensors"))
    if kind == "vit":
        assert set(theirs) <= set(ours) and theirs, f"mergekit wrote {sorted(set(theirs) - set(ours))} that we did not"
    else:
        assert set(theirs) == set(ours), f"keys differ: ours only {sorted(set(ours) - set(theirs))[:5]}, mergekit only {sorted(set(theirs) - set(ours))[:5]}"
    worst, where = 0.0, None
    for key, want in theirs.items():
        assert ours[key].dtype == want.dtype and ours[key].shape == want.shape, key
        diff = float((ours[key].double() - want.double()).abs().max()) if want.numel() else 0.0
        if diff >= worst:
            worst, where = diff, key
    print(f"\nmergekit parity {kind}/{method}: {len(theirs)} tensors, max abs diff {worst:.3g} ({where})")
    assert worst <= ATOL, f"{kind}/{method}: max abs diff {worst:.3g} on '{where}'; expected <= {ATOL}"
    # the merge did something: the output differs from the base (slerp/TA/...) or from every input (linear)
    ref = load_file(str(root / kind / ("ft0" if method == "linear" else "base") / "model.safetensors"))
    assert any(not torch.equal(ours[k], ref[k]) for k in theirs)
