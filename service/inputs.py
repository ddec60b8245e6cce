"""Named inputs of a bring-your-own-models bundle (`Manifest.inputs`): request values -> the graph's feeds.

One concept: parse -> arrays. A bundle without `inputs` (the digits default) never comes here: its one
flat float32 input is parsed by service/payload.py as before, with no per-request work added.

Each `TensorSpec` becomes one or more graph feeds `{graph input name: np.ndarray}`:
- kind "tensor": the client's values (nested lists in JSON, OIP data) checked for dtype, rank and the
  fixed dimensions, as the spec's dtype;
- kind "image" (shape ("batch", C, H, W), float32): base64 PNG/JPEG strings (or raw bytes from OIP
  BYTES or an `image/png`/`image/jpeg` body) decoded with Pillow into the spec's mode, refused above
  FUSION_MAX_IMAGE_PIXELS from the header alone (before any pixel is decoded), resized bilinearly to
  (H, W) when the size differs, and fed as raw 0..255 float32 values in (B, C, H, W): the
  normalisation `(x * scale - mean) / std` is inside the graph. Uint8 or float pixel tensors
  (B, C, H, W) given as nested lists are taken as they are;
- kind "text": strings, tokenized with the bundle's tokenizer.json (`tokenizers`; loaded once per
  bundle version, from bytes checked against `Manifest.files`) into int64 `text["graph_inputs"]`
  (input_ids, attention_mask, and zero token_type_ids when listed), truncated at `max_length` and
  padded to the longest row of the request, so a row's answer does not depend on its batch (the
  graph masks the padding). A string over FUSION_MAX_TEXT_CHARS characters is refused.

Every bad input is an InputError (400) naming the input, what was expected and what was got.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fusion.bundle import TensorSpec
from fusion.errors import BundleError, InputError

Feeds = dict[str, np.ndarray]

NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
         "uint8": np.uint8, "bool": np.bool_}
OIP_DATATYPE = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8", "bool": "BOOL"}
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg")
IMAGE_FORMATS = ["PNG", "JPEG"]  # the only decoders Pillow may use: no exotic format parser sees client bytes
MODE_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}
TEXT_GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
WARMUP_SEQUENCE = 4  # the sequence length of the warm-up's text feeds
# a text input tokenizes at most max_length * this many characters of a string: the tokens within max_length
# are the same unless they average more than this many characters each (then the string is cut mid-token)
TEXT_CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class Limits:
    """Per-request bounds (service/config.py Settings: FUSION_MAX_ROWS, FUSION_MAX_IMAGE_PIXELS, FUSION_MAX_TEXT_CHARS,
    FUSION_MAX_REQUEST_PIXELS)."""

    max_rows: int = 1024
    max_image_pixels: int = 4096 * 4096
    max_text_chars: int = 10_000
    # all the images of one request together (from their headers, before any is decoded); see decode_images
    max_request_pixels: int = 4 * 4096 * 4096


def n_rows(feeds: Feeds) -> int:
    """The batch size of named feeds (every feed has the same first dimension)."""
    return len(next(iter(feeds.values())))


def take(X, rows: np.ndarray):
    """Rows `rows` (a boolean mask or indices) of a flat batch or of named feeds."""
    if type(X) is dict:
        return {k: np.ascontiguousarray(v[rows]) for k, v in X.items()}
    return np.ascontiguousarray(X[rows])


def can_join(a, b, pads: Mapping[str, int]) -> bool:
    """Whether two requests' inputs can share one model call: flat rows of the same width, or named feeds with
    the same names, each of the same dtype and the same dimensions past the batch, except the text feeds in
    `pads` ((B, S) ids and masks), which are re-padded to the longest row (the graph masks the padding)."""
    if type(a) is not dict or type(b) is not dict:
        return type(a) is not dict and type(b) is not dict and a.shape[1:] == b.shape[1:]
    if a.keys() != b.keys():
        return False
    return all(a[k].dtype == b[k].dtype and (a[k].shape[1:] == b[k].shape[1:] or (k in pads and a[k].ndim == b[k].ndim == 2))
               for k in a)


def join_feeds(parts: Sequence[Feeds], pads: Mapping[str, int]) -> Feeds | None:
    """Several requests' named feeds as one call's (rows in order), text feeds padded on the right to the
    widest with `pads[name]` (the tokenizer's pad id for input_ids, 0 for masks and token types); None when
    they cannot share a call (`can_join`)."""
    if not all(can_join(parts[0], p, pads) for p in parts[1:]):
        return None
    out = {}
    for k in parts[0]:
        arrays = [p[k] for p in parts]
        width = max(a.shape[1] for a in arrays) if k in pads else None
        if width is not None and any(a.shape[1] != width for a in arrays):
            arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=pads[k]) for a in arrays]
        out[k] = np.concatenate(arrays)
    return out


def _kind(v) -> str:
    return "null" if v is None else "boolean" if isinstance(v, bool) else type(v).__name__


def _dims(shape: tuple) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class Inputs:
    """The bundle's named inputs, and the tokenizers its text inputs need (one per bundle version)."""

    def __init__(self, specs: tuple[TensorSpec, ...], tokenizers: dict[str, Any] | None = None):
        self.specs = {s.name: s for s in specs}
        # text input name -> (tokenizers.Tokenizer truncating at max_length, the id padding is filled with)
        self.tokenizers = tokenizers or {}
        self.graph_inputs = {s.name: _check_spec(s) for s in specs}  # input name -> its graph feeds
        feeds = [g for gs in self.graph_inputs.values() for g in gs]
        if len(set(feeds)) != len(feeds):
            raise BundleError(f"manifest inputs: expected distinct graph input names; got {feeds}")
        self.feed_names = tuple(feeds)

    # ---- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, bundle) -> "Inputs":
        """The inputs of a verified bundle; each text input's tokenizer is read from bytes checked
        against `Manifest.files` (fusion.bundle.Bundle.read_file) and parsed once, here."""
        tokenizers = {}
        for s in bundle.manifest.inputs:
            if s.kind == "text":
                tokenizers[s.name] = load_tokenizer(bundle.read_file(s.text["tokenizer"]), s)
        return cls(bundle.manifest.inputs, tokenizers)

    # ---- describing -------------------------------------------------------------------------------

    def describe(self) -> list[dict]:
        """For /info: each client-facing input with its kind, dtype, shape and its kind's settings."""
        out = []
        for s in self.specs.values():
            d = {"name": s.name, "kind": s.kind, "dtype": s.dtype, "shape": list(s.shape)}
            if s.kind == "image":
                d["image"] = s.image
                d["accepts"] = ["base64 PNG/JPEG strings", "uint8 or float pixels (batch, C, H, W)",
                                "a raw image/png or image/jpeg body (one row)"]
            if s.kind == "text":
                d["text"] = {**s.text, "graph_inputs": list(self.graph_inputs[s.name])}
                d["accepts"] = ["strings"]
            out.append(d)
        return out

    def oip_metadata(self) -> list[dict]:
        """OIP model metadata inputs: encoded images and strings are BYTES [-1]; tensors their datatype, -1 per dynamic dim."""
        out = []
        for s in self.specs.values():
            if s.kind in ("image", "text"):
                out.append({"name": s.name, "datatype": "BYTES", "shape": [-1]})
            else:
                out.append({"name": s.name, "datatype": OIP_DATATYPE[s.dtype],
                            "shape": [-1 if isinstance(d, str) else int(d) for d in s.shape]})
        return out

    def values_per_row(self) -> int | None:
        """The most JSON values one row can hold (for the 413 before parsing), None when a dimension is dynamic
        or an input is text: the check counts commas, and ordinary prose has many (the body limit bounds it)."""
        total = 0
        for s in self.specs.values():
            if s.kind == "text":
                return None
            fixed = s.shape[1:]
            if any(isinstance(d, str) for d in fixed):
                return None
            total += math.prod(fixed)  # Python ints: numpy's int64 product wraps
        return total

    @property
    def pads(self) -> dict[str, int]:
        """{text graph feed: the value its padding holds}: the tokenizer's pad id for input_ids, 0 for the
        attention mask and token types; what the adaptive batcher re-pads requests of different lengths with.
        Only inputs whose graph takes the attention mask: without it, padding would change a row's answer, so
        such requests share a call only at the same width."""
        pads = {}
        for name, (_tok, pad) in self.tokenizers.items():
            if "attention_mask" in self.graph_inputs[name]:
                pads |= {g: (pad if g == "input_ids" else 0) for g in self.graph_inputs[name]}
        return pads

    def example(self, batch: int) -> Feeds:
        """Feeds of `batch` rows for the warm-up: zeros (attention masks ones), dynamic dims of WARMUP_SEQUENCE."""
        feeds = {}
        for s in self.specs.values():
            if s.kind == "text":
                for g in self.graph_inputs[s.name]:
                    fill = np.ones if g == "attention_mask" else np.zeros
                    feeds[g] = fill((batch, WARMUP_SEQUENCE), dtype=np.int64)
            else:
                shape = (batch, *[WARMUP_SEQUENCE if isinstance(d, str) else int(d) for d in s.shape[1:]])
                feeds[s.name] = np.zeros(shape, dtype=NUMPY[s.dtype])
        return feeds

    def feeds_from_lists(self, data: dict) -> Feeds:
        """A manifest's probe rows as feeds: {graph input: nested list}, each as its dtype, or {input name:
        value} as a client sends them (strings for text, base64 for images), parsed as a request."""
        if set(data) != set(self.feed_names):
            return self.convert(dict(data), Limits(max_rows=1 << 20, max_image_pixels=1 << 26, max_text_chars=1 << 20,
                                                   max_request_pixels=1 << 40))
        dtypes = {}
        for s in self.specs.values():
            for g in self.graph_inputs[s.name]:
                dtypes[g] = np.int64 if s.kind == "text" else NUMPY[s.dtype]
        return {g: np.ascontiguousarray(np.asarray(data[g], dtype=dtypes[g])) for g in self.feed_names}

    # ---- parsing ----------------------------------------------------------------------------------

    def parse(self, value, limits: Limits, *, field: str = "inputs") -> Feeds:
        """/predict's `inputs`: an object {input name: value}, or (a bundle with one input) the value itself."""
        if isinstance(value, dict):
            values = value
        elif len(self.specs) == 1:
            values = {next(iter(self.specs)): value}
        else:
            raise InputError(f"expected '{field}' to be an object with the inputs {self._expected()}; got {_kind(value)}")
        return self.convert(values, limits)

    def convert(self, values: dict, limits: Limits) -> Feeds:
        """{input name: value} -> feeds, every input present, all with the same number of rows."""
        unknown = sorted(set(values) - set(self.specs), key=str)
        if unknown:
            raise InputError(f"unknown input {str(unknown[0])!r:.80}; expected the inputs {self._expected()}")
        missing = [n for n in self.specs if n not in values]
        if missing:
            raise InputError(f"missing input '{missing[0]}'; expected the inputs {self._expected()}")
        feeds, rows = {}, None
        for name, spec in self.specs.items():
            got = self._one(spec, values[name], limits)
            b = n_rows(got)
            if rows is not None and b != rows:
                raise InputError(f"input '{name}': expected {rows} rows, as the inputs before it; got {b}")
            rows = b
            feeds.update(got)
        return feeds

    def parse_image_body(self, data: bytes, limits: Limits) -> Feeds:
        """A raw image/png or image/jpeg body: one row of the bundle's only input, an image."""
        specs = list(self.specs.values())
        if len(specs) != 1 or specs[0].kind != "image":
            from service.errors import UnsupportedMediaError  # lazy: errors.py imports the web stack

            raise UnsupportedMediaError(f"expected Content-Type application/json: a raw image body needs a bundle whose one "
                                        f"input is an image; this bundle's inputs are {self._expected()}")
        spec = specs[0]
        return {spec.name: decode_images([data], spec, limits)}

    def _expected(self) -> str:
        return "{" + ", ".join(f"'{s.name}': {s.kind} {s.dtype} {_dims(s.shape)}" for s in self.specs.values()) + "}"

    def _one(self, spec: TensorSpec, value, limits: Limits) -> Feeds:
        if spec.kind == "text":
            return self._text(spec, value, limits)
        if spec.kind == "image" and isinstance(value, list) and value and isinstance(value[0], (str, bytes)):
            _check_rows(spec, len(value), limits)
            return {spec.name: decode_images(value, spec, limits)}
        return {spec.name: tensor(spec, value, limits)}

    def _text(self, spec: TensorSpec, value, limits: Limits) -> Feeds:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list):
            raise InputError(f"input '{spec.name}': expected a list of strings (text); got {_kind(texts)}")
        texts = list(texts)  # OIP BYTES are decoded in place below: never the caller's list
        _check_rows(spec, len(texts), limits)
        for i, t in enumerate(texts):
            if isinstance(t, bytes):  # OIP BYTES
                try:
                    texts[i] = t = t.decode("utf-8")
                except UnicodeDecodeError:
                    raise InputError(f"input '{spec.name}'[{i}]: expected UTF-8 text; got bytes that are not UTF-8") from None
            if not isinstance(t, str):
                raise InputError(f"input '{spec.name}'[{i}]: expected a string; got {_kind(t)}")
            if len(t) > limits.max_text_chars:
                raise InputError(f"input '{spec.name}'[{i}]: expected at most {limits.max_text_chars} characters "
                                 f"(FUSION_MAX_TEXT_CHARS); got {len(t)}")
        tok, pad = self.tokenizers[spec.name]
        # only the first max_length * TEXT_CHARS_PER_TOKEN characters are tokenized: tokens past max_length are
        # dropped anyway, and `encode` tokenizes the whole string before it truncates (per string: alone = in a batch)
        cut = int(spec.text["max_length"]) * TEXT_CHARS_PER_TOKEN
        encodings = [tok.encode(t[:cut]) for t in texts]
        lengths = [len(e.ids) for e in encodings]
        for i, n in enumerate(lengths):
            if n == 0:
                raise InputError(f"input '{spec.name}'[{i}]: expected text that gives at least one token; got none")
        width = max(lengths)  # padded to the longest row of this request; the graph masks the padding
        ids = np.full((len(texts), width), pad, dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for i, e in enumerate(encodings):
            ids[i, :lengths[i]] = e.ids
            mask[i, :lengths[i]] = 1
        made = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {g: made[g] for g in self.graph_inputs[spec.name]}


# ---- specs and tokenizers ----------------------------------------------------------------------------


def _check_spec(s: TensorSpec) -> tuple[str, ...]:
    """The graph feeds of a spec the service can parse into; a bundle that breaks one is refused when it loads (503)."""
    where = f"manifest input '{s.name}'"
    if s.dtype not in NUMPY:
        raise BundleError(f"{where}: expected a dtype in {sorted(NUMPY)}; got {s.dtype!r:.40}")
    if not s.shape or s.shape[0] != "batch" or not all(isinstance(d, str) or (isinstance(d, int) and d > 0) for d in s.shape):
        raise BundleError(f"{where}: expected a shape starting with \"batch\", of positive ints and named dims; got {list(s.shape)!r:.80}")
    if s.kind == "image":
        mode = (s.image or {}).get("mode", "RGB")
        if len(s.shape) != 4 or not all(isinstance(d, int) for d in s.shape[1:]) or MODE_CHANNELS.get(mode) != s.shape[1]:
            raise BundleError(f"{where}: expected an image shape [\"batch\", C, H, W] with C the channels of mode "
                              f"{mode!r} ({MODE_CHANNELS.get(mode, '?')}); got {list(s.shape)}")
    elif s.kind == "text":
        t = s.text or {}
        graph = t.get("graph_inputs") or ["input_ids", "attention_mask"]
        if not isinstance(t.get("tokenizer"), str) or not set(graph) <= set(TEXT_GRAPH_INPUTS) or "input_ids" not in graph:
            raise BundleError(f"{where}: expected text {{tokenizer: a bundle file, graph_inputs: some of "
                              f"{list(TEXT_GRAPH_INPUTS)} with input_ids}}; got {t!r:.120}")
        if not isinstance(t.get("max_length"), int) or t["max_length"] < 1:
            raise BundleError(f"{where}: expected text.max_length a positive integer; got {t.get('max_length')!r:.40}")
        return tuple(graph)
    elif s.kind != "tensor":
        raise BundleError(f"{where}: expected kind tensor, image or text; got {s.kind!r:.40}")
    return (s.name,)


def load_tokenizer(data: bytes, spec: TensorSpec):
    """A `tokenizers.Tokenizer` from tokenizer.json bytes (already checked against their sha256),
    truncating at the spec's max_length; padding is done per request here, not by the tokenizer."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - a base dependency; only a broken install lacks it
        raise BundleError("this bundle has a text input and the `tokenizers` package is not installed "
                          "(pip install tokenizers; it is a dependency of fusion-serve)") from None
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - the library raises plain Exception on a bad file
        raise BundleError(f"input '{spec.name}': {spec.text['tokenizer']} is not a tokenizer.json the "
                          f"`tokenizers` library loads: {str(exc):.200}") from None
    pad = int((tok.padding or {}).get("pad_id", 0))  # what the file pads with; padding is ours from here on
    tok.no_padding()
    tok.enable_truncation(int(spec.text["max_length"]))
    return tok, pad


# ---- tensors ------------------------------------------------------------------------------------------


def _check_rows(spec: TensorSpec, rows: int, limits: Limits) -> None:
    if rows < 1:
        raise InputError(f"input '{spec.name}': expected at least one row; got none")
    if rows > limits.max_rows:
        raise InputError(f"input '{spec.name}': expected at most {limits.max_rows} rows per request (FUSION_MAX_ROWS); got {rows}")


def _has_boolean(value) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list):
        return any(_has_boolean(v) for v in value)
    return False


def tensor(spec: TensorSpec, value, limits: Limits) -> np.ndarray:
    """Nested lists (JSON) or an array (OIP) -> the spec's dtype, checked for rank, dims and values.
    An image input's pixels: uint8 or float (B, C, H, W) as they are, as float32."""
    want = f"{spec.dtype} {_dims(spec.shape)}"
    if isinstance(value, np.ndarray):
        arr = value
    else:
        if not isinstance(value, list):
            raise InputError(f"input '{spec.name}': expected {want} as nested lists; got {_kind(value)}")
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):
            raise InputError(f"input '{spec.name}': expected {want} as regularly nested lists; got ragged lists") from None
        if spec.dtype != "bool" and arr.dtype.kind in "iuf" and _has_boolean(value):
            raise InputError(f"input '{spec.name}': expected {spec.dtype} numbers; got a boolean among them")
    if arr.ndim != len(spec.shape):
        raise InputError(f"input '{spec.name}': expected rank {len(spec.shape)} ({want}); got rank {arr.ndim} {list(arr.shape)}")
    for axis, (d, g) in enumerate(zip(spec.shape, arr.shape)):
        if isinstance(d, int) and d != g:
            raise InputError(f"input '{spec.name}': expected dimension {axis} to be {d} ({want}); got {g} {list(arr.shape)}")
        if isinstance(d, str) and axis > 0 and g < 1:
            raise InputError(f"input '{spec.name}': expected dimension {axis} ('{d}') of at least 1 ({want}); got {g}")
    _check_rows(spec, arr.shape[0], limits)
    kind = arr.dtype.kind
    target = np.dtype(NUMPY[spec.dtype])
    if spec.dtype == "bool":
        if kind != "b":
            raise InputError(f"input '{spec.name}': expected booleans ({want}); got values of dtype {arr.dtype}")
        return np.ascontiguousarray(arr)
    if target.kind in "iu":
        if kind not in "iu":
            raise InputError(f"input '{spec.name}': expected integers ({want}); got values of dtype "
                             f"{'float' if kind == 'f' else arr.dtype}")
        info = np.iinfo(target)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise InputError(f"input '{spec.name}': expected {spec.dtype} values in [{info.min}, {info.max}]; "
                             f"got values in [{arr.min()}, {arr.max()}]")
        return np.ascontiguousarray(arr, dtype=target)
    if kind not in "iuf":
        raise InputError(f"input '{spec.name}': expected numbers ({want}); got values of dtype {arr.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=target)
    bad = ~np.isfinite(out)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"input '{spec.name}'{list(at)}: expected a finite number within {spec.dtype} range; "
                         f"got {float(arr[at])}")
    return out


# ---- images -------------------------------------------------------------------------------------------


def decode_images(items: list, spec: TensorSpec, limits: Limits) -> np.ndarray:
    """Encoded PNG/JPEG images (base64 strings, or bytes) -> (B, C, H, W) float32 raw 0..255 values.

    Every header is read before any image is decoded: each image is bounded (FUSION_MAX_IMAGE_PIXELS) and so
    is their sum, by FUSION_MAX_REQUEST_PIXELS or the rows at the graph's own H x W, whichever is larger
    (decoding and resizing cost about the pixels decoded: 4096x4096 took 257 ms, and an 8 MiB body holds
    ~170 such PNGs; rows at the graph's size cost what the tensor they fill does, bounded by FUSION_MAX_ROWS)."""
    _, c, h, w = spec.shape
    mode = (spec.image or {}).get("mode", "RGB")
    opened = [_open(_image_bytes(item, f"input '{spec.name}'[{i}]"), limits.max_image_pixels, f"input '{spec.name}'[{i}]")
              for i, item in enumerate(items)]
    total = sum(img.size[0] * img.size[1] for img in opened)
    budget = max(limits.max_request_pixels, len(items) * h * w)
    if total > budget:
        raise InputError(f"input '{spec.name}': expected at most {budget} pixels in all the images of a request "
                         f"(FUSION_MAX_REQUEST_PIXELS; or {len(items)} rows at the graph's {w}x{h}); got {total} in {len(items)} images")
    out = np.empty((len(items), c, h, w), dtype=np.float32)
    for i, img in enumerate(opened):
        out[i] = _pixels(img, mode, (h, w), f"input '{spec.name}'[{i}]")
    return out


def _image_bytes(item, where: str) -> bytes:
    """One image as the client sent it (a base64 string, or OIP BYTES) -> its encoded bytes."""
    if isinstance(item, str):
        try:
            return base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{where}: expected a base64-encoded PNG or JPEG image; got a string that is not base64") from None
    if not isinstance(item, bytes):
        raise InputError(f"{where}: expected a base64-encoded PNG or JPEG image (a string); got {_kind(item)}")
    return item


def _open(data: bytes, max_pixels: int, where: str):
    """A PNG or JPEG opened from its header only (no pixel decoded), within `max_pixels`."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InputError(f"{where}: expected a PNG or JPEG image; got {len(data)} bytes that are neither "
                         f"(starting {data[:8]!r})") from None
    except Image.DecompressionBombError as exc:  # Pillow's own limit (2x its MAX_IMAGE_PIXELS), also from the header
        raise InputError(f"{where}: expected an image of at most {max_pixels} pixels (FUSION_MAX_IMAGE_PIXELS); "
                         f"got far more ({str(exc).split(',')[0]:.100})") from None
    width, height = img.size
    if width * height > max_pixels:  # before any pixel is decoded
        raise InputError(f"{where}: expected an image of at most {max_pixels} pixels (FUSION_MAX_IMAGE_PIXELS); "
                         f"got {width}x{height} = {width * height}")
    return img


def _pixels(img, mode: str, size: tuple[int, int], where: str) -> np.ndarray:
    """An opened image decoded into `mode`, resized bilinearly to `size` (H, W) -> (C, H, W) uint8."""
    from PIL import Image

    try:
        img = img.convert(mode)
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{where}: expected a PNG or JPEG image that decodes; got one that does not "
                         f"({str(exc):.120})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
