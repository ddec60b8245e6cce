"""The bundle: `manifest.json` + ONNX files, the only thing that passes from `fusion/` to `service/`.

Written atomically (a staging directory renamed into place); read with every sha256 verified before
any file is parsed. This module imports neither torch nor onnxruntime: the service uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from fusion.errors import IntegrityError, ManifestError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("ensemble", "merged", "distilled", "member", "quantized")


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
    # `comparison` holds latencies measured at build time: a report about the bundle, not part of it
    data = {k: v for k, v in manifest.to_dict().items() if k not in ("created", "bundle_version", "comparison")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def finalize_manifest(stage: Path, manifest: Manifest) -> Manifest:
    """Fill every entry's sha256 from the staged files and derive the bundle version."""

    def digest(entries: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
        return {k: replace(e, sha256=sha256_file(stage / e.file)) for k, e in entries.items()}

    manifest = replace(manifest, variants=digest(manifest.variants), members=digest(manifest.members))
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

    def file(self, name: str) -> Path:
        return self.path / self.manifest.entry(name).file

    def read_verified(self, name: str) -> bytes:
        """The bytes of an entry's file, checked against its sha256 (the bytes that get parsed)."""
        entry = self.manifest.entry(name)
        data = _safe_path(self.path, entry.file).read_bytes()
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


def read_manifest_json(path: str | Path) -> dict:
    """The raw JSON object of a bundle directory's `manifest.json` (no file is hashed or parsed here)."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise ManifestError(f"{path}: no {MANIFEST} (is this a bundle directory? build one with `fusion build`)")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ManifestError(f"{mpath}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{mpath}: expected a JSON object; got {type(data).__name__}")
    return data


def read_bundle(path: str | Path) -> Bundle:
    """Read `manifest.json` and verify every listed file's sha256 before anything else is parsed."""
    path = Path(path)
    manifest = Manifest.from_dict(read_manifest_json(path))
    for name, entry in manifest.entries().items():
        got = sha256_file(_safe_path(path, entry.file))
        if got != entry.sha256:
            raise IntegrityError(
                f"{entry.file}: sha256 mismatch: manifest says {entry.sha256}, file has {got}"
            )
    return Bundle(path, manifest)
