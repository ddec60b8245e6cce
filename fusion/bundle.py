"""The bundle: `manifest.json` + ONNX files, the only thing that passes from `fusion/` to `service/`.

Written atomically (a staging directory renamed into place); read with every sha256 verified before
any file is parsed. This module imports neither torch nor onnxruntime: the service uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from fusion.errors import IntegrityError, ManifestError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("ensemble", "merged", "distilled", "member", "quantized")
# A manifest larger than this is refused before it is parsed (the service: FUSION_MAX_MANIFEST_BYTES).
# A tabular bundle's is tens of kB (8 probe rows and the scaling per feature); very wide inputs need
# more (8 probe rows of 3x224x224 images are ~10-25 MB of JSON): raise the setting for those.
MAX_MANIFEST_BYTES = 8 << 20


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class InputSpec:
    """Raw-feature input: name, shape with -1 for the batch axis, dtype, and the scaling baked into graphs."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scaling: dict
    image_shape: tuple[int, ...] | None = None

    @property
    def n_features(self) -> int:
        return int(self.shape[1])


INPUT_KINDS = ("tensor", "image", "text")
INPUT_DTYPES = ("float32", "float16", "int64", "int32", "uint8", "bool")


@dataclass(frozen=True)
class TensorSpec:
    """One named, client-facing input of a bring-your-own-models bundle (issue 15; the recipe's `[[inputs]]`).

    A bundle whose `Manifest.inputs` is empty has the single flat feature input `Manifest.input`
    (the digits default); with `inputs`, the service parses each request into these named tensors.
    - kind "tensor": the client sends the tensor (nested lists, or OIP data) of `dtype` and `shape`;
    - kind "image": shape ("batch", C, H, W), dtype float32; clients send encoded PNG/JPEG (base64 in
      JSON, BYTES in OIP) or uint8 pixels; the service decodes to uint8 and resizes to (H, W); the graph
      itself normalises, `(x * scale - mean) / std` per channel, so `image` = {"mode": "RGB",
      "scale": ..., "mean": [...], "std": [...]} is a description, not work for the service;
    - kind "text": clients send strings; the service tokenizes with the bundle's `text["tokenizer"]`
      (a file named in `Manifest.files`) into `text["graph_inputs"]` (int64 ("batch", "sequence")
      tensors, e.g. input_ids, attention_mask[, token_type_ids]), padded per request batch and
      truncated at `text["max_length"]`.
    """

    name: str
    dtype: str  # one of INPUT_DTYPES
    shape: tuple  # ints, and strings naming dynamic dimensions; shape[0] == "batch"
    kind: str = "tensor"  # one of INPUT_KINDS
    image: dict | None = None
    text: dict | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One servable ONNX file: a variant (`ensemble`, `merged`, ...) or a member."""

    file: str
    sha256: str
    kind: str
    combiner: dict | None = None  # ensemble: {"name": ..., "weights": ...}
    method: dict | None = None  # merged / distilled / quantized: how it was made
    members: tuple[str, ...] = ()  # the members an ensemble combines, in graph order
    metrics: dict = field(default_factory=dict)
    n_parameters: int = 0
    parity: dict | None = None  # the export gate's report
    arch: dict | None = None  # members: {"arch": ..., "args": ...}
    # bring-your-own members (issue 15), all empty for the digits zoo's members: which bundle input feeds
    # each of the file's own inputs ({member input: bundle input}; empty: by position), what its output is
    # ("logits" | "probabilities"; empty: probabilities, as every exported member and variant), and which
    # output to read when the file has several (empty: the first)
    input_map: dict = field(default_factory=dict)
    output: str = ""
    output_name: str = ""
    # a member served elsewhere (issue 19): the URL of its OIP v2 model, `http(s)://HOST:PORT/v2/models/NAME`
    # (FUSION_MEMBER_URL_<NAME> overrides it at serving time: service/remote.py). Such an entry has no file
    # (`file` and `sha256` empty); its `output` must be declared ("logits" | "probabilities") and `output_name`
    # names the OIP output to read (empty: "probabilities", what a fusion-serve member answers)
    remote: str = ""
    # "one_row": a member whose batch dimension is fixed (the recipe's `fixed_batch`, issue 15), run one row
    # per call (service/runtime.Model; in the fused graph, a Loop over the rows); empty: any batch
    fixed_batch: str = ""



@dataclass(frozen=True)
class Manifest:
    schema_version: int
    bundle_version: str
    created: str
    task: str
    input: InputSpec
    output_name: str
    classes: tuple
    variants: dict[str, ModelEntry]
    members: dict[str, ModelEntry]
    dataset: dict = field(default_factory=dict)
    comparison: dict | None = None
    probe: dict | None = None  # {"inputs": rows, "outputs": {name: expected}}: re-run by the service on load
    # how the ensemble's weights were chosen (every candidate's out-of-fold validation and test figures) and
    # the gate against its best member (`gate.warning`); absent from older manifests (None)
    ensemble_selection: dict | None = None
    # bring-your-own-models bundles (issue 15): named inputs (empty: the single flat `input` above) and
    # the other files the service reads (a tokenizer.json...), name -> sha256, verified before parsing
    inputs: tuple[TensorSpec, ...] = ()
    files: dict = field(default_factory=dict)

    def entry(self, name: str) -> ModelEntry:
        """A variant or a member by name."""
        if name in self.variants:
            return self.variants[name]
        if name in self.members:
            return self.members[name]
        from fusion.errors import UnknownNameError

        raise UnknownNameError(
            f"unknown variant '{name}'; expected one of {sorted(self.variants) + sorted(self.members)}"
        )

    def entries(self) -> dict[str, ModelEntry]:
        return {**self.variants, **self.members}

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        try:
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ManifestError(
                    f"expected manifest schema_version {SCHEMA_VERSION}; got {data.get('schema_version')!r}"
                )
            inp = dict(data["input"])
            inp["shape"] = tuple(inp["shape"])
            if inp.get("image_shape") is not None:
                inp["image_shape"] = tuple(inp["image_shape"])

            def entries(d: dict) -> dict[str, ModelEntry]:
                return {k: ModelEntry(**{**v, "members": tuple(v.get("members", ()))}) for k, v in d.items()}

            return cls(**{
                **data,
                "input": InputSpec(**inp),
                "inputs": tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])}) for t in data.get("inputs", ())),
                "files": dict(data.get("files", {})),
                "classes": tuple(data["classes"]),
                "variants": entries(data["variants"]),
                "members": entries(data["members"]),
            })
        except ManifestError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # AttributeError: a list/str where a table belongs
            raise ManifestError(f"malformed manifest: {type(exc).__name__}: {exc}") from None


def bundle_version(manifest: "Manifest") -> str:
    """Content address of a bundle: a digest of its canonical manifest (every file digest, the classes,
    the input scaling, combiners, metrics, probe) without `created` and `bundle_version` themselves,
    so equal bundles share a version and bundles that answer differently never do."""
    return manifest_version(manifest.to_dict())


NEW_MANIFEST_FIELDS = ("inputs", "files")  # added with issue 15; count in the version only when set
NEW_ENTRY_FIELDS = ("input_map", "output", "output_name", "remote", "fixed_batch")  # remote: issue 19


def manifest_version(data: dict) -> str:
    """`bundle_version` of a manifest given as its JSON object (what `manifest.json` holds).

    The same digest as at build time: JSON renders the dataclass's tuples as lists, and a float
    written by `json` reads back to the same float, so hashing what was read equals hashing what was
    written. The service recomputes it on load and refuses a manifest whose recorded version differs."""
    # `comparison` holds latencies measured at build time: a report about the bundle, not part of it
    data = {k: v for k, v in data.items() if k not in ("created", "bundle_version", "comparison")}
    # fields added after a bundle format was in use count only when set, so older bundles keep their version
    data = {k: v for k, v in data.items() if not (k in NEW_MANIFEST_FIELDS and not v)}
    for group in ("variants", "members"):
        if isinstance(data.get(group), dict):
            data[group] = {name: {k: v for k, v in e.items() if not (k in NEW_ENTRY_FIELDS and not v)}
                           if isinstance(e, dict) else e for name, e in data[group].items()}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def finalize_manifest(stage: Path, manifest: Manifest) -> Manifest:
    """Fill every entry's sha256 from the staged files and derive the bundle version."""

    def digest(entries: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
        return {k: e if not e.file else replace(e, sha256=sha256_file(stage / e.file)) for k, e in entries.items()}

    manifest = replace(manifest, variants=digest(manifest.variants), members=digest(manifest.members),
                       files={rel: sha256_file(stage / rel) for rel in manifest.files})  # extra files (a tokenizer.json)
    return replace(manifest, bundle_version=bundle_version(manifest),
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory below root to disk (durability before the directory is renamed)."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class BundleWriter:
    """Stage files in a sibling temp directory, then swap it into place with renames.

    with BundleWriter(out) as w:
        export_onnx(model, w.stage / "ensemble.onnx", ...)
        w.commit(manifest)    # digests + manifest written, directory renamed into place
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.stage = self.out.parent / f".{self.out.name}.stage-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "BundleWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.stage.mkdir()
        return self

    def commit(self, manifest: Manifest) -> Manifest:
        manifest = finalize_manifest(self.stage, manifest)
        tmp = self.stage / f".{MANIFEST}.tmp"
        tmp.write_text(manifest.to_json())
        os.replace(tmp, self.stage / MANIFEST)
        _fsync_tree(self.stage)  # a crash after the rename never leaves a manifest over empty files
        old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.stage, self.out)
        shutil.rmtree(old, ignore_errors=True)
        return manifest

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)  # nothing left behind on failure


@dataclass(frozen=True)
class Bundle:
    """A bundle directory whose manifest has been read and whose files have all been verified."""

    path: Path
    manifest: Manifest
    manifest_sha256: str = ""  # of the manifest.json bytes that were parsed
    sizes: dict[str, int] = field(default_factory=dict)  # entry name -> size of the file that was verified
    file_sizes: dict[str, int] = field(default_factory=dict)  # Manifest.files path -> size verified

    def read_file(self, rel: str) -> bytes:
        """The bytes of one of `Manifest.files` (a tokenizer.json...), checked against its sha256 as
        `read_verified` checks a model's: the bytes returned are the bytes that were hashed."""
        digest = self.manifest.files.get(rel)
        if digest is None:
            raise ManifestError(f"{rel}: expected a file listed in the manifest's 'files'; it lists {sorted(self.manifest.files)}")
        size = self.file_sizes.get(rel)
        with _open_regular(_safe_path(self.path, rel), rel) as fh:
            data = fh.read() if size is None else fh.read(size + 1)
        if size is not None and len(data) != size:
            raise IntegrityError(f"{rel}: changed since it was verified ({size} bytes then, {len(data)}+ now)")
        got = sha256_bytes(data)
        if got != digest:
            raise IntegrityError(f"{rel}: sha256 mismatch: manifest says {digest}, file has {got}")
        return data

    def file(self, name: str) -> Path:
        return self.path / self.manifest.entry(name).file

    def read_verified(self, name: str) -> bytes:
        """The bytes of an entry's file, checked against its sha256 (the bytes that get parsed).

        At most the size verified by `read_bundle` is read: a file swapped for a larger one since then
        is refused without being read whole."""
        entry = self.manifest.entry(name)
        size = self.sizes.get(name)
        with _open_regular(_safe_path(self.path, entry.file), entry.file) as fh:
            data = fh.read() if size is None else fh.read(size + 1)
        if size is not None and len(data) != size:
            now = f"{len(data)}" if len(data) < size else f"more than {size}"
            raise IntegrityError(f"{entry.file}: changed since it was verified ({size} bytes then, {now} now)")
        got = sha256_bytes(data)
        if got != entry.sha256:
            raise IntegrityError(
                f"{entry.file}: sha256 mismatch: manifest says {entry.sha256}, file has {got}"
            )
        return data


def _safe_path(root: Path, rel: str) -> Path:
    """A manifest path that stays inside the bundle (no absolute paths, `..` or escaping links)."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ManifestError(f"{rel}: expected a relative path inside the bundle; got one that leaves it")
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise ManifestError(f"{rel}: resolves outside the bundle (a symbolic link?)")
    if not full.is_file():
        raise ManifestError(f"{rel}: listed in the manifest but missing from {root}")
    return full


def _open_regular(path: Path, rel: str):
    """`path` opened for binary reading, refused unless it is a regular file *now*: a FIFO or a device
    put in its place after `is_file()` was checked would block the open or never reach its end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO does not wait for a writer
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ManifestError(f"{rel}: expected a regular file; got another kind of file (a FIFO or a device?)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _sha256_regular(path: Path, rel: str, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256, size) of a regular file (see `_open_regular`)."""
    h, size = hashlib.sha256(), 0
    with _open_regular(path, rel) as fh:
        while block := fh.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _read_manifest(path: Path, max_bytes: int) -> tuple[dict, str]:
    """The JSON object of `manifest.json` and the sha256 of its bytes; over `max_bytes` it is refused
    before parsing (parsing costs ~10x the text in memory, and the text is the bundle author's)."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ManifestError(f"{path}: no {MANIFEST} (is this a bundle directory? build one with `fusion build`)")
    with _open_regular(mpath, MANIFEST) as fh:
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ManifestError(
            f"{mpath}: expected at most {max_bytes} bytes (FUSION_MAX_MANIFEST_BYTES); got more: refused before "
            f"parsing (a tabular bundle's manifest is tens of kB; raise the limit for a bundle with very wide inputs)"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSON or UTF-8 errors, an integer of over 4300 digits; deep nesting
        raise ManifestError(f"{mpath}: not valid JSON ({type(exc).__name__}: {str(exc):.200})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{mpath}: expected a JSON object; got {type(data).__name__}")
    return data, sha256_bytes(raw)


def read_manifest_json(path: str | Path, max_bytes: int = MAX_MANIFEST_BYTES) -> dict:
    """The raw JSON object of a bundle directory's `manifest.json` (no file is hashed or parsed here)."""
    return _read_manifest(Path(path), max_bytes)[0]


def verify_version(data: dict) -> str:
    """The manifest's `bundle_version`, checked against the digest of its content (`manifest_version`).

    The version names the bundle in every response, in the metrics and in A/B statistics; a manifest
    edited after the build (or forged) would otherwise serve different answers under an old name."""
    recorded, expected = data.get("bundle_version"), manifest_version(data)
    if recorded != expected:
        raise IntegrityError(
            f"{MANIFEST}: bundle_version mismatch: the manifest says {str(recorded)[:40]!r}, its content hashes to "
            f"{expected!r} (edited after the build? a bundle's version is the digest of its manifest)"
        )
    return expected


def read_bundle(path: str | Path, *, max_manifest_bytes: int = MAX_MANIFEST_BYTES, check_version: bool = False,
                manifest_sha256: str | None = None) -> Bundle:
    """Read `manifest.json` and verify every listed file's sha256 before anything else is parsed.

    `check_version` also recomputes the bundle version (the service does); `manifest_sha256` refuses
    a manifest whose bytes differ from those an earlier check read (the service's second load, after
    the check in a child process: see service/preflight.py)."""
    path = Path(path)
    data, digest = _read_manifest(path, max_manifest_bytes)
    if manifest_sha256 is not None and digest != manifest_sha256:
        raise IntegrityError(
            f"{MANIFEST}: changed between the check and the load (sha256 {manifest_sha256[:16]}... then, "
            f"{digest[:16]}... now); refused: try the load again"
        )
    manifest = Manifest.from_dict(data)
    sizes = {}
    for name, entry in manifest.entries().items():
        if entry.remote or (not entry.file and entry.kind == "ensemble" and entry.members):
            # served elsewhere (service/remote.py; a split front's ensemble is its remote members combined):
            # no file here; checked against the probe rows at load instead
            if entry.file or entry.sha256:
                raise ManifestError(f"'{name}': a remote member ({entry.remote[:80]}) has no file here; got file {entry.file!r:.80}")
            continue
        got, sizes[name] = _sha256_regular(_safe_path(path, entry.file), entry.file)
        if got != entry.sha256:
            raise IntegrityError(
                f"{entry.file}: sha256 mismatch: manifest says {entry.sha256}, file has {got}"
            )
    file_sizes = {}
    for rel, want in manifest.files.items():  # extra files the service reads (a tokenizer.json), checked alike
        got, file_sizes[rel] = _sha256_regular(_safe_path(path, rel), rel)
        if got != want:
            raise IntegrityError(f"{rel}: sha256 mismatch: manifest says {want}, file has {got}")
    if check_version:
        verify_version(data)
    return Bundle(path, manifest, digest, sizes, file_sizes)
