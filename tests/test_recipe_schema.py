"""The recipe as pydantic models (issue 15): strict types, Literal choices, unknown keys refused, one
ConfigError line per recipe naming the key, what was expected and what was got; `fusion recipe-schema`
prints a JSON Schema that accepts the shipped example and refuses the same bad values."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import jsonschema
import pytest

from fusion.errors import ConfigError
from fusion.recipe import (
    DistillSection, InputSection, MemberSection, Recipe, load_recipe, override, parse_recipe, recipe_schema,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "recipe.toml"

# values the dataclass recipe accepted before issue 15 (each is now refused), and the message expected
WRONGLY_ACCEPTED = [
    ({"build": {"compare_rounds": 2.5}}, "[build].compare_rounds expected an integer; got 2.5"),
    ({"ensemble": {"weights": ["x", None]}}, "[ensemble].weights[0] expected a number; got 'x'"),
    ({"distill": {"hidden": [1.5, "a"]}}, "[distill].hidden[0] expected an integer; got 1.5"),
    ({"data": {"task": "nonsense"}}, "[data].task expected one of ['classification', 'regression']; got 'nonsense'"),
    ({"merge": {"align": "nonsense"}},
     "[merge].align expected one of ['', 'weight_matching', 'activation_matching']; got 'nonsense'"),
]


@pytest.mark.parametrize("doc, message", WRONGLY_ACCEPTED)
def test_values_accepted_before_are_refused_with_key_expected_and_got(doc, message):
    with pytest.raises(ConfigError) as info:
        parse_recipe(doc)
    text = str(info.value)
    assert text.startswith("recipe: ") and message in text and "\n" not in text, text


def test_every_bad_item_of_a_list_is_named():
    with pytest.raises(ConfigError) as info:
        parse_recipe({"ensemble": {"weights": ["x", None]}, "distill": {"hidden": [1.5, "a"]}})
    text = str(info.value)
    for part in ("[ensemble].weights[1] expected a number; got None", "[distill].hidden[1] expected an integer; got 'a'"):
        assert part in text, text


@pytest.mark.parametrize("doc, message", [
    ({"build": {"compare": "yes"}}, "[build].compare expected true or false; got 'yes'"),
    ({"distill": {"epochs": True}}, "[distill].epochs expected an integer; got true"),  # a bool is not a number
    ({"distill": {"lr": "0.1"}}, "[distill].lr expected a number; got '0.1'"),
    ({"distill": {"temperature": 0}}, "[distill].temperature expected a number > 0.0; got 0"),
    ({"distill": {"epochs": 0}}, "[distill].epochs expected an integer >= 1; got 0"),
    ({"ensemble": {"calibration": "platt"}}, "[ensemble].calibration expected one of ['none', 'temperature']"),
    ({"ensemble": {"weights": {"mlp_0": True}}}, "[ensemble].weights expected a number for mlp_0; got true"),
    ({"ensemble": {"weights": 3}}, "[ensemble].weights expected a list of numbers, a table {name = weight} or one of"),
    ({"zoo": {"members": "mlp_0"}}, "[zoo].members expected a list; got 'mlp_0'"),
    ({"merge": 1}, "[merge] expected a table; got 1"),
    ({"members": [{"name": "a"}]}, "[[members]][0].source expected a value (this key is required); got nothing"),
    ({"members": [{"name": "a", "source": "zoo:mlp", "output": "scores"}]},
     "[[members]][0].output expected one of ['logits', 'probabilities']; got 'scores'"),
    ({"members": [{"name": "a b", "source": "zoo:mlp"}]}, "[[members]][0].name expected a name of letters"),
    ({"inputs": [{"name": "x", "shape": ["batch", 1.5]}]}, "[[inputs]][0].shape[1] expected an integer or a string; got 1.5"),
    ({"inputs": [{"name": "x", "shape": [4, 8]}]}, '[[inputs]][0]: shape expected a first dimension "batch"; got [4, 8]'),
    ({"inputs": [{"name": "x", "shape": ["batch", 8], "dtype": "double"}]}, "[[inputs]][0].dtype expected one of ['float32'"),
    ({"serve": {"split": "yes"}}, "[serve].split expected true or false; got 'yes'"),
    ({"serve": {"url_template": "http://member:3000/v2/models/x"}},
     "[serve]: url_template expected an http(s) URL with {name} and/or {host} (one URL per member)"),
    ({"serve": {"url_template": "http://{host}/v2/models/{model}"}}, "and no other fields; got 'http://{host}/v2/models/{model}'"),
])
def test_strict_types_and_choices(doc, message):
    with pytest.raises(ConfigError) as info:
        parse_recipe(doc)
    assert message in str(info.value), str(info.value)


def test_unknown_keys_and_sections_list_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown keys in \[\[members\]\]\[0\]: \['wieghts'\]; expected some of "
                                          r"\['args', 'fixed_batch', 'input_map', 'name', 'output', 'output_name', 'source', 'weights'\]"):
        parse_recipe({"members": [{"name": "a", "source": "zoo:mlp", "wieghts": "x"}]})
    with pytest.raises(ConfigError, match=r"unknown keys in \[\[inputs\]\]\[0\].image: \['mena'\]"):
        parse_recipe({"inputs": [{"name": "x", "shape": ["batch", 3, 8, 8], "kind": "image", "image": {"mena": [0]}}]})
    with pytest.raises(ConfigError, match=r"unknown sections \['member'\]; expected some of .*'members'"):
        parse_recipe({"member": [{"name": "a", "source": "zoo:mlp"}]})


def test_direct_construction_and_override_raise_config_errors_not_pydantic_ones():
    with pytest.raises(ConfigError, match=r"\[distill\].alpha expected a number <= 1.0; got 2"):
        DistillSection(alpha=2)
    with pytest.raises(ConfigError, match=r"unknown keys in \[zoo\]: \['directory'\]"):
        override(Recipe(), "zoo", directory="x")
    with pytest.raises(ConfigError, match=r"\[build\].compare_rounds expected an integer >= 1; got 0"):
        override(Recipe(), "build", compare_rounds=0)
    # what the CLI passes (tuples, floats from argparse) still works, and the models stay frozen dataclasses
    r = override(override(Recipe(), "ensemble", weights=(1, 2)), "distill", hidden=(32,), temperature=2.0)
    assert r.ensemble.weights == (1.0, 2.0) and r.distill.hidden == (32,) and r.distill.temperature == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.distill.epochs = 3
    assert dataclasses.replace(r.build, out="x").out == "x"


def test_ints_are_taken_where_numbers_are_expected_and_become_floats():
    r = parse_recipe({"distill": {"temperature": 4, "alpha": 1}, "ensemble": {"weights": {"mlp_0": 2}}})
    assert r.distill.temperature == 4.0 and isinstance(r.distill.temperature, float)
    assert r.ensemble.weights == {"mlp_0": 2.0}


def test_members_and_inputs_tables():
    r = parse_recipe({
        "members": [
            {"name": "resnet_a", "source": "timm:resnet10t", "weights": "ckpt/a.safetensors",
             "args": {"num_classes": 10, "in_chans": 3}, "output": "logits", "input_map": {"x": "pixels"}},
            {"name": "vit", "source": "onnx:vit.onnx", "output": "probabilities"},
        ],
        "inputs": [
            {"name": "pixels", "dtype": "FP32", "shape": ["batch", 3, 32, 32], "kind": "image",
             "image": {"mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}},
            {"name": "ids", "dtype": "INT64", "shape": ["batch", "sequence"], "kind": "text",
             "tokenizer": "tok/tokenizer.json", "max_length": 64},
        ],
        "data": {"classes": [str(i) for i in range(10)]},
    })
    assert [m.name for m in r.members] == ["resnet_a", "vit"]
    assert r.members[0].args == {"num_classes": 10, "in_chans": 3} and r.members[1].output == "probabilities"
    assert [i.dtype for i in r.inputs] == ["float32", "int64"]  # OIP names normalised
    assert r.data.source == "digits"  # a [data] section keeps its source

    from fusion.bundle import TensorSpec

    pixels, ids = (i.to_tensor_spec() for i in r.inputs)
    assert pixels == TensorSpec(name="pixels", dtype="float32", shape=("batch", 3, 32, 32), kind="image",
                                image={"mode": "RGB", "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3})
    assert ids.text == {"tokenizer": "tokenizer.json", "max_length": 64, "graph_inputs": ["input_ids", "attention_mask"]}
    assert isinstance(r.members[0], MemberSection) and isinstance(r.inputs[0], InputSection)


@pytest.mark.parametrize("doc, message", [
    ({"members": [{"name": "a", "source": "timn:resnet10t"}]},
     "[[members]][0]: source expected a prefix among ['zoo:', 'timm:', 'torchvision:', 'hf:', 'python:', 'onnx:']"),
    ({"members": [{"name": "a", "source": "zoo:mlp"}, {"name": "a", "source": "zoo:cnn"}]},
     "[[members]] expected unique names; got ['a'] more than once"),
    ({"members": [{"name": "a", "source": "zoo:mlp", "input_map": {"x": "pixels"}}]},
     "[[members]] 'a' input_map expected bundle inputs among ['input']; got ['pixels']"),
    ({"inputs": [{"name": "p", "shape": ["batch", 3, 8, 8], "kind": "image", "image": {"mode": "L"}}]},
     "image.mode expected 3 channel(s) as shape[1] says"),
    ({"inputs": [{"name": "p", "shape": ["batch", 3, 8, 8], "kind": "image", "image": {"std": [1, 1]}}]},
     "image.std expected 3 values, one per channel; got [1.0, 1.0]"),
    ({"inputs": [{"name": "t", "shape": ["batch", "sequence"], "dtype": "int64", "kind": "text"}]},
     'tokenizer expected a tokenizer.json path for kind "text"'),
    ({"inputs": [{"name": "x", "shape": ["batch", 4], "tokenizer": "t.json"}]}, "no tokenizer or max_length for kind 'tensor'"),
    ({"data": {"source": ""}}, '[data].source expected "digits" or a data file ("" only with [[inputs]]); got ""'),
    ({"data": {"classes": ["a", "a"]}}, "[data].classes expected unique names; got ['a'] more than once"),
])
def test_tables_are_checked_against_each_other(doc, message):
    with pytest.raises(ConfigError) as info:
        parse_recipe(doc)
    assert message in str(info.value), str(info.value)


def test_inputs_without_a_data_section_use_no_data_set():
    r = parse_recipe({"inputs": [{"name": "x", "shape": ["batch", 4]}]})
    assert r.data.source == "" and r.inputs[0].dtype == "float32" and r.inputs[0].kind == "tensor"


# --- the JSON Schema ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict:
    return recipe_schema()


def test_recipe_schema_command_prints_a_valid_json_schema(capsys):
    from fusion.cli import main

    assert main(["recipe-schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(printed)
    assert printed == json.loads(json.dumps(recipe_schema()))
    assert printed["additionalProperties"] is False
    assert set(printed["properties"]) == {"data", "zoo", "ensemble", "merge", "distill", "build", "serve", "members", "inputs"}
    serve = printed["$defs"]["ServeSection"]["properties"]  # issue 19: the recipe switch for `fusion build --split`
    assert serve["split"] == {"default": False, "title": "Split", "type": "boolean"}, serve
    assert {"split_dir", "url_template"} <= set(serve) and printed["$defs"]["ServeSection"]["additionalProperties"] is False


def test_schema_accepts_the_example_and_its_commented_members_and_inputs(schema):
    from tests.test_example_recipe import commented_arrays

    validator = jsonschema.Draft202012Validator(schema)
    for doc in (tomllib.loads(EXAMPLE.read_text()), tomllib.loads(commented_arrays())):
        assert list(validator.iter_errors(doc)) == []
        parse_recipe(doc)  # and the models accept what the schema accepts


@pytest.mark.parametrize("doc", [d for d, _ in WRONGLY_ACCEPTED] + [
    {"ensemble": {"weigths": [1]}}, {"members": [{"name": "a"}]}, {"inputs": [{"name": "x", "shape": ["batch", 1.5]}]},
    {"distill": {"epochs": 0}}, {"serve": {"split": 1}}, {"serve": {"spilt": True}},
])
def test_schema_rejects_the_bad_values_the_models_reject(schema, doc):
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(doc)), doc
    with pytest.raises(ConfigError):
        parse_recipe(doc)


def test_existing_recipe_files_load_unchanged(tmp_path):
    assert load_recipe(EXAMPLE) == Recipe() and load_recipe(None) == Recipe()
    path = tmp_path / "r.toml"
    path.write_text('[ensemble]\nweights = [1, 2]\n[distill]\nhidden = [32]\nepochs = 3\n[build]\nquantize = true\n')
    r = load_recipe(path)
    assert r.ensemble.weights == (1, 2) and r.distill.hidden == (32,) and r.build.quantize is True
    assert r.members == () and r.inputs == () and r.data.classes == ()


@pytest.mark.parametrize("key", ["temperature", "lr", "noise_std", "weight_decay", "mixup_alpha", "alpha"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_are_refused(key, value):
    """TOML spells inf and nan; a recipe float must be finite (review s2)."""
    text = f"[distill]\n{key} = {value}\n"
    with pytest.raises(ConfigError, match=rf"\[distill\].{key} expected a finite number; got {value.lstrip('+')}"):
        parse_recipe(tomllib.loads(text))


@pytest.mark.parametrize("section, key, value, bound", [
    ("distill", "epochs", 10**12, 100_000),
    ("distill", "batch_size", 10**10, 1_048_576),
    ("distill", "hidden", [10**9], 65_536),
    ("distill", "patience", 10**12, 100_000),
    ("distill", "copies", 10**6, 1_000),
    ("distill", "threads", 10**6, 1_024),
    ("build", "compare_rounds", 10**9, 100_000),
])
def test_integers_have_upper_bounds_named_in_the_message(section, key, value, bound):
    shown = "[1000000000]" if isinstance(value, list) else str(value)
    where = rf"\[{section}\].{key}(\[0\])?"
    with pytest.raises(ConfigError, match=rf"{where} expected an integer at most {bound}; got {shown.strip('[]')}"):
        parse_recipe({section: {key: value}})
    ok = [bound] if isinstance(value, list) else bound
    assert getattr(getattr(parse_recipe({section: {key: ok}}), section), key) == (tuple(ok) if isinstance(ok, list) else ok)
