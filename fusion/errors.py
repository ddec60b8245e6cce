"""One exception tree for fusion-serve; the service maps it to HTTP in one place (service/errors.py).

    FusionError
    ├── InputError (ValueError)                        bad user input: shapes, dtypes, values         -> 400
    │   ├── DataFormatError                            a malformed data file (names the file)         -> 400
    │   ├── ConfigError                                a bad recipe, weight vector or option          -> 400
    │   │   └── MemberError                            a member file that cannot be composed (names it) -> 400
    │   ├── UnknownNameError (KeyError)                an unknown registry name (lists valid ones)    -> 404
    │   ├── PayloadTooLargeError                       a request body or batch over the limit         -> 413
    │   ├── UnsupportedMediaError [service.errors]     a body of a content type not accepted          -> 415
    │   ├── NonFiniteOutputError [service.errors]      a variant's NaN/Inf answer (counted against it) -> 400
    │   └── RequestTimeoutError [service.errors]       a body that did not arrive in time             -> 408
    ├── AuthError [service.errors]                     a missing or wrong token; a token's scope      -> 401/403
    ├── BundleError (OSError)                          a bundle that cannot be used                   -> 503
    │   ├── IntegrityError                             a file whose sha256 differs from the manifest  -> 503
    │   ├── ManifestError                              a manifest that is missing or malformed        -> 503
    │   ├── UnsafeModelError [service.onnx_check]      an ONNX file the service will not load         -> 503
    │   └── MismatchError [service.remote]             a remote member that answers unlike the bundle -> 503
    ├── ExportError (RuntimeError)                     an ONNX export that failed its parity gate (offline only)
    └── UnavailableError (RuntimeError)                the service is not ready / a member failed     -> 503
        ├── DeadlineError [service.errors]             a member or request past its deadline          -> 504
        ├── OverloadedError [service.errors]           every inference slot of the worker is taken    -> 429
        └── RemoteError [service.remote]               a remote member's failed call or bad answer    -> 503

A class without [module] lives here. (builtins) are the builtins a class also inherits directly, so
callers can catch either; -> is the HTTP status `service.errors.status_for` gives it (anything not
drawn is a 500). tests/test_error_tree.py checks this drawing against the classes (`__subclasses__()`):
draw a new error class here. This module must stay free of torch: the service imports it.
"""

from __future__ import annotations


class FusionError(Exception):
    """Base class of every error raised on purpose by fusion-serve."""


class InputError(FusionError, ValueError):
    """Input that does not fit what was expected; the message says both."""


class DataFormatError(InputError):
    """A data file that cannot be used; the message names the file and the problem."""


class ConfigError(InputError):
    """A recipe, a weight vector or an option that is invalid."""


class MemberError(ConfigError):
    """A member (an ONNX file from another exporter) that cannot join the ensemble: a fixed batch
    dimension, a ZipMap (map) output, an input or output name that does not exist, an operator domain
    that cannot be converted. The message names the member, what was expected and what was got."""


class UnknownNameError(InputError, KeyError):
    """A name that is not in a registry; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PayloadTooLargeError(InputError):
    """A request body or a batch larger than the configured limit."""


class BundleError(FusionError, OSError):
    """A bundle directory that cannot be served."""


class IntegrityError(BundleError):
    """A bundle file whose sha256 does not match the manifest."""


class ManifestError(BundleError):
    """A manifest that is missing, malformed or of an unknown schema version."""


class ExportError(FusionError, RuntimeError):
    """An ONNX export that failed its check or its parity gate against torch."""


class UnavailableError(FusionError, RuntimeError):
    """The service cannot answer now (not ready, or a member failed)."""
