"""Small, deterministic bundles for the reliability suite, written with fusion.bundle's own writer.

Each member is a two-layer MLP graph (standardise -> Gemm -> Relu -> Gemm -> Softmax) built with
`onnx.helper` from seeded numpy weights; the `ensemble` variant is the fused graph that runs every
member and averages their probabilities (soft vote), exactly what members mode recombines in numpy.
Building one takes well under a second, so the suite does not depend on training or export: the
service sees the same kind of bundle `fusion build` writes (single-file ONNX, opset 17, digests).

Hostile bundles (external data, custom ops, a pickle where a model should be) are derived from a
good one by `rewrite`, which re-digests the manifest and recomputes its version: the attacker
controls the whole directory, so the digest check alone cannot be what stops them. `load_bombs`
adds the ones that attack the load itself: a model that never finishes, one that needs more memory
than the machine has, a manifest too large to parse safely, a manifest whose version lies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from fusion.bundle import MANIFEST, SCHEMA_VERSION, BundleWriter, InputSpec, Manifest, ModelEntry, read_bundle

N_FEATURES, N_CLASSES, HIDDEN = 64, 10, 16
MEMBERS = ("mlp_0", "mlp_1", "mlp_2", "mlp_3")
OPSET = 17


def _weights(seed: int, i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * seed + i)
    return {
        "W1": (rng.standard_normal((N_FEATURES, HIDDEN)) / np.sqrt(N_FEATURES)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
        "W2": (rng.standard_normal((HIDDEN, N_CLASSES)) / np.sqrt(HIDDEN) * 3).astype(np.float32),
        "b2": (0.1 * rng.standard_normal(N_CLASSES)).astype(np.float32),
    }


def _member_nodes(prefix: str, w: dict, out: str):
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(v, f"{prefix}{k}") for k, v in w.items()]
    inits += [numpy_helper.from_array(np.full(N_FEATURES, 8.0, np.float32), f"{prefix}mean"),
              numpy_helper.from_array(np.full(N_FEATURES, 5.0, np.float32), f"{prefix}std")]
    nodes = [
        helper.make_node("Sub", ["input", f"{prefix}mean"], [f"{prefix}c"]),
        helper.make_node("Div", [f"{prefix}c", f"{prefix}std"], [f"{prefix}z"]),
        helper.make_node("Gemm", [f"{prefix}z", f"{prefix}W1", f"{prefix}b1"], [f"{prefix}h"]),
        helper.make_node("Relu", [f"{prefix}h"], [f"{prefix}r"]),
        helper.make_node("Gemm", [f"{prefix}r", f"{prefix}W2", f"{prefix}b2"], [f"{prefix}logits"]),
        helper.make_node("Softmax", [f"{prefix}logits"], [out], axis=-1),
    ]
    return nodes, inits


def _model(nodes, inits) -> bytes:
    from onnx import TensorProto, checker, helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", N_FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", N_CLASSES])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    checker.check_model(model, full_check=True)
    return model.SerializeToString()


def member_model(seed: int, i: int) -> bytes:
    nodes, inits = _member_nodes("", _weights(seed, i), "probabilities")
    return _model(nodes, inits)


def ensemble_model(seed: int, members: tuple[int, ...]) -> bytes:
    from onnx import helper

    nodes, inits, outs = [], [], []
    for i in members:
        n, w = _member_nodes(f"m{i}_", _weights(seed, i), f"m{i}_p")
        nodes += n
        inits += w
        outs.append(f"m{i}_p")
    nodes.append(helper.make_node("Mean", outs, ["probabilities"]))
    return _model(nodes, inits)


def make_bundle(out: str | Path, seed: int = 0, members: tuple[str, ...] = MEMBERS) -> Manifest:
    """A bundle: `ensemble` (soft vote of `members`, fused) + every member; weights from `seed`."""
    idx = tuple(MEMBERS.index(m) for m in members)
    with BundleWriter(out) as w:
        (w.stage / "members").mkdir()
        (w.stage / "ensemble.onnx").write_bytes(ensemble_model(seed, idx))
        for name, i in zip(members, idx):
            (w.stage / f"members/{name}.onnx").write_bytes(member_model(seed, i))
        n_params = N_FEATURES * HIDDEN + HIDDEN + HIDDEN * N_CLASSES + N_CLASSES
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, bundle_version="", created="", task="classification",
            input=InputSpec(name="input", shape=(-1, N_FEATURES), dtype="float32",
                            scaling={"kind": "standardize", "mean": [8.0] * N_FEATURES, "std": [5.0] * N_FEATURES}),
            output_name="probabilities", classes=tuple(range(N_CLASSES)),
            variants={"ensemble": ModelEntry(file="ensemble.onnx", sha256="", kind="ensemble",
                                             combiner={"name": "soft_vote", "weights": None}, members=tuple(members),
                                             n_parameters=n_params * len(members))},
            members={m: ModelEntry(file=f"members/{m}.onnx", sha256="", kind="member", n_parameters=n_params)
                     for m in members},
            dataset={"name": f"synthetic-{seed}", "task": "classification"},
        )
        return w.commit(manifest)


def rewrite(src: str | Path, out: str | Path, files: dict[str, bytes] | None = None, *,
            point: dict[str, str] | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """Copy bundle `src` to `out`, replace file contents (`files`: relative path -> bytes), point
    manifest entries at other files (`point`: entry name -> relative path), add `extra` files, and
    re-digest every entry and recompute the bundle version so the manifest is self-consistent (as an
    attacker would make it)."""
    from fusion.bundle import manifest_version, sha256_file

    src, out = Path(src), Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, symlinks=True)
    for rel, data in {**(files or {}), **(extra or {})}.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    data = json.loads((out / MANIFEST).read_text())
    for section in ("variants", "members"):
        for name, e in data[section].items():
            if point and name in point:
                e["file"] = point[name]
            p = out / e["file"]
            if p.is_file():
                e["sha256"] = sha256_file(p)
    data["bundle_version"] = manifest_version(data)  # the content address of what the manifest now says
    (out / MANIFEST).write_text(json.dumps(data, indent=2))
    return out


def offline(bundle: str | Path, variant: str, X: np.ndarray) -> np.ndarray:
    """The variant's output on X computed offline: onnxruntime in this process, one thread."""
    import onnxruntime as ort

    b = read_bundle(bundle)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(b.read_verified(variant), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": np.ascontiguousarray(X, dtype=np.float32)})[0]


def offline_members(bundle: str | Path, members: list[str], X: np.ndarray) -> np.ndarray:
    """Soft vote over `members` only (the healthy-subset oracle for quorum answers)."""
    return np.mean([offline(bundle, m, X) for m in members], axis=0)


def digits_like(n: int, seed: int = 0) -> np.ndarray:
    """Rows shaped like the digits data set: 64 pixel intensities in [0, 16]."""
    return np.random.default_rng(seed).integers(0, 17, size=(n, N_FEATURES)).astype(np.float32)


def version_of(bundle: str | Path) -> str:
    return json.loads((Path(bundle) / MANIFEST).read_text())["bundle_version"]




# ---- hostile model files ---------------------------------------------------------------------


def external_data_model(location: str, seed: int = 0, i: int = 0) -> tuple[bytes, bytes]:
    """A member model whose first-layer weights live in an external file at `location`
    (relative, `../`, absolute, or a link): (model bytes, the weights' raw bytes to put there)."""
    import onnx
    from onnx import TensorProto

    model = onnx.load_from_string(member_model(seed, i))
    w = next(t for t in model.graph.initializer if t.name == "W1")
    raw = w.raw_data or np.asarray(onnx.numpy_helper.to_array(w), dtype=np.float32).tobytes()
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    del w.external_data[:]
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        e = w.external_data.add()
        e.key, e.value = k, v
    return model.SerializeToString(), raw


def custom_op_model(domain: str = "evil.ops", op: str = "Pwn") -> bytes:
    """A model whose only node is `domain:op`, which needs a custom-op library (native code)."""
    from onnx import TensorProto, helper

    node = helper.make_node(op, ["input"], ["probabilities"], domain=domain)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", N_FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", N_CLASSES])],
    )
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


class CanaryPayload:
    """Unpickling this creates the canary file (what a real payload would do instead is worse)."""

    def __init__(self, canary: str | Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (open, (self.canary, "w"))


def pickle_payload(canary: str | Path) -> bytes:
    import pickle

    return pickle.dumps({"state_dict": CanaryPayload(canary)}, protocol=4)


def hostile_bundles(good: str | Path, where: str | Path, canary: str | Path) -> dict[str, tuple[Path, str]]:
    """Bundles derived from `good` that the service must refuse, each with a self-consistent manifest
    unless the point is a mismatch: name -> (bundle directory, text the refusal must contain).
    Files the hostile references point at are real and readable, so only the service's checks stop them."""
    where = Path(where)
    where.mkdir(parents=True, exist_ok=True)
    outside = where / "outside.bin"
    out: dict[str, tuple[Path, str]] = {}

    corrupt = rewrite(good, where / "corrupt")
    f = corrupt / "members/mlp_2.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))  # after the digests were written: a mismatch
    out["corrupt_file"] = (corrupt, "members/mlp_2.onnx")

    missing = rewrite(good, where / "missing")
    (missing / "members/mlp_1.onnx").unlink()
    out["missing_file"] = (missing, "members/mlp_1.onnx")

    for name, location in (("external_parent_dir", "../../outside.bin"), ("external_absolute", str(outside)),
                           ("external_symlink", "link.bin"), ("external_inside_bundle", "weights.bin"),
                           ("external_server_cwd", "README.md")):
        model, raw = external_data_model(location)
        outside.write_bytes(raw)
        extra = {}
        if location == "weights.bin":
            extra = {"members/weights.bin": raw}
        b = rewrite(good, where / name, {"members/mlp_0.onnx": model}, extra=extra)
        if location == "link.bin":
            (b / "members/link.bin").symlink_to(outside)
        out[name] = (b, "external file")

    out["custom_op_domain"] = (rewrite(good, where / "custom_op", {"ensemble.onnx": custom_op_model()}), "evil.ops")
    out["unknown_builtin_op"] = (rewrite(good, where / "unknown_op", {"ensemble.onnx": custom_op_model("", "NoSuchOp")}),
                                 "ensemble.onnx: onnxruntime could not load it")
    out["pickle_as_onnx"] = (rewrite(good, where / "pickle_as_onnx", {"members/mlp_1.onnx": pickle_payload(canary)}),
                             "members/mlp_1.onnx: not an ONNX model")
    out["pickle_manifest_entry"] = (
        rewrite(good, where / "pickle_entry", point={"mlp_1": "members/mlp_1.pkl"}, extra={"members/mlp_1.pkl": pickle_payload(canary)}),
        "members/mlp_1.pkl: not an ONNX model")

    link = rewrite(good, where / "symlinked_file")
    target = where / "outside_model.onnx"
    target.write_bytes(member_model(0, 3))
    (link / "members/mlp_3.onnx").unlink()
    (link / "members/mlp_3.onnx").symlink_to(target)
    out["symlinked_model_file"] = (rewrite(link, where / "symlinked_file_redigested"), "members/mlp_3.onnx")
    shutil.rmtree(link)

    out["manifest_path_traversal"] = (rewrite(good, where / "traversal", point={"ensemble": "../v2/ensemble.onnx"}),
                                      "../v2/ensemble.onnx")
    return out


# ---- hostile at load time: models that hang or exhaust memory, manifests that are too big or lie ----


def _probabilities_head(x: str, prefix: str = "h_"):
    """Nodes and weights turning a (batch, N_FEATURES) tensor `x` into (batch, N_CLASSES) probabilities."""
    from onnx import helper, numpy_helper

    w = np.full((N_FEATURES, N_CLASSES), 0.01, np.float32)
    inits = [numpy_helper.from_array(w, f"{prefix}W"), numpy_helper.from_array(np.zeros(N_CLASSES, np.float32), f"{prefix}b")]
    nodes = [helper.make_node("Gemm", [x, f"{prefix}W", f"{prefix}b"], [f"{prefix}logits"]),
             helper.make_node("Softmax", [f"{prefix}logits"], ["probabilities"], axis=-1)]
    return nodes, inits


def _identity_loop_body():
    """A Loop body that passes its condition and its tensor through unchanged."""
    from onnx import TensorProto, helper

    return helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["x_in"], ["x_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None)],
    )


def loop_model(trip_count: int = 2**62) -> bytes:
    """A valid classifier whose input first goes through a `Loop` of `trip_count` iterations with an
    identity body: a few hundred bytes that take forever to run once `trip_count` is huge (2^62
    iterations at ~1 µs each are ~146 000 years). With a small trip count it answers normally."""
    from onnx import helper, numpy_helper

    body = _identity_loop_body()
    inits = [numpy_helper.from_array(np.array(trip_count, np.int64), "trips"), numpy_helper.from_array(np.array(True), "keep_going")]
    head, head_inits = _probabilities_head("looped")
    nodes = [helper.make_node("Loop", ["trips", "keep_going", "input"], ["looped"], body=body), *head]
    return _model(nodes, inits + head_inits)


def input_loop_model() -> bytes:
    """A valid classifier whose `Loop` runs as many times as the input's largest value: instant on
    zeros and on digits-like rows (at most 16 iterations), so it passes every check before loading,
    and practically endless on one crafted row holding 1e18 (the hang comes with the request)."""
    from onnx import TensorProto, helper, numpy_helper

    body = _identity_loop_body()
    head, head_inits = _probabilities_head("looped")
    nodes = [helper.make_node("ReduceMax", ["input"], ["input_max"], keepdims=0),
             helper.make_node("Cast", ["input_max"], ["trips"], to=TensorProto.INT64),
             helper.make_node("Loop", ["trips", "keep_going", "input"], ["looped"], body=body), *head]
    return _model(nodes, [numpy_helper.from_array(np.array(True), "keep_going"), *head_inits])


def expand_model(shape: tuple[int, ...]) -> bytes:
    """A valid classifier that also materialises a float32 tensor of `shape` (Expand of a scalar: a
    few hundred bytes of file, `4 * prod(shape)` bytes of memory at load or warm-up), reduced to a
    scalar 0 that is added to the logits, so the big tensor is needed for the output."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(shape, np.int64), "big_shape")]
    head, head_inits = _probabilities_head("shifted")
    nodes = [helper.make_node("Expand", ["zero", "big_shape"], ["big"]),
             helper.make_node("ReduceMax", ["big"], ["big_max"], keepdims=0),
             helper.make_node("Add", ["input", "big_max"], ["shifted"]), *head]
    return _model(nodes, inits + head_inits)


def edit_manifest(bundle: str | Path, edit, *, reversion: bool = True) -> Path:
    """Apply `edit(data)` to a bundle's manifest in place; `reversion` recomputes `bundle_version`
    (a self-consistent manifest, as an attacker or a careless tool would write it)."""
    from fusion.bundle import manifest_version

    path = Path(bundle) / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    if reversion:
        data["bundle_version"] = manifest_version(data)
    path.write_text(json.dumps(data, indent=2))
    return Path(bundle)


def load_bombs(good: str | Path, where: str | Path, *, over_limit_mb: int) -> dict[str, tuple[Path, str]]:
    """Bundles derived from `good` that must be refused at load time without hanging or killing the
    process that loads them: name -> (bundle directory, text the refusal must contain). Every file
    digest is valid; `over_limit_mb` sizes the Expand that must exceed the load memory limit."""
    from fusion.bundle import MAX_MANIFEST_BYTES

    where = Path(where)
    out: dict[str, tuple[Path, str]] = {}
    out["loop_2_62"] = (rewrite(good, where / "loop", {"members/mlp_0.onnx": loop_model()}), "FUSION_LOAD_TIMEOUT_S")
    # the 256 GB Expand ([2^16, 2^16, 16] float32), and one just over the memory limit, which a
    # machine with that much free memory would really allocate without the limit
    out["expand_256gb"] = (rewrite(good, where / "expand_256gb", {"ensemble.onnx": expand_model((2**16, 2**16, 16))}),
                           "FUSION_LOAD_MAX_MEMORY_MB")
    n = (over_limit_mb << 20) // 4 + (256 << 20)  # float32s: the limit plus 1 GiB
    out["expand_over_limit"] = (rewrite(good, where / "expand_over_limit", {"members/mlp_1.onnx": expand_model((n // 1024, 1024))}),
                                "FUSION_LOAD_MAX_MEMORY_MB")
    big = rewrite(good, where / "manifest_too_large")
    edit_manifest(big, lambda d: d["dataset"].update(notes="x" * MAX_MANIFEST_BYTES))
    out["manifest_too_large"] = (big, "FUSION_MAX_MANIFEST_BYTES")
    forged = rewrite(good, where / "version_forged")
    edit_manifest(forged, lambda d: d.update(bundle_version="0123456789ab"), reversion=False)  # digests still valid
    out["version_forged"] = (forged, "bundle_version")
    relabelled = rewrite(good, where / "content_edited")  # answers differently under the old version's name
    edit_manifest(relabelled, lambda d: d.update(classes=list(reversed(d["classes"]))), reversion=False)
    out["content_edited"] = (relabelled, "bundle_version")
    return out
