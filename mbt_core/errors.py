"""The project's error tree.

    MbtError
    ├── CheckpointError      a checkpoint file is missing, truncated, corrupt or mismatched
    ├── TokenizerError       a tokenizer cannot be trained, saved or loaded
    ├── CodecError           a wire tensor is malformed (dtype, shape, size, compression)
    ├── CertificateError     TLS material is missing, malformed, expired or not from the cluster CA
    ├── ArtifactError        an exported artifact is missing, altered or malformed
    │   └── SignatureError   a signed document is unsigned, untrusted, expired or rolled back
    │       ├── TrustRootError   a trust root is malformed, under-signed, skips a version, expired
    │       └── RosterError      a roster of allowed node ids is malformed, unsigned or expired
    ├── SessionRefused       a node refuses a session's step (raised below its servicer, which
    │   │                    maps each kind to one gRPC status)
    │   ├── CacheBehind      the cache holds fewer positions than the step assumed: replay first
    │   ├── OutOfContext     the step reaches past the model's context window
    │   ├── LimitExceeded    a node limit or a caller's quota is full (``limit`` names it)
    │   ├── NotSessionOwner  the session belongs to another caller
    │   └── SessionEnded     the session was ended; a late step may not open it again
    ├── NoBranchAvailable    every branch of a layer was masked or rejected
    └── QuorumNotReached     fewer branches answered than the fan-out policy requires

Configuration mistakes raise ``ValueError`` from the config dataclasses' ``__post_init__``.
"""

from __future__ import annotations


class MbtError(Exception):
    """Base class of every error this project raises on purpose."""


class CheckpointError(MbtError):
    """A checkpoint cannot be written or read back as a valid model."""


class TokenizerError(MbtError):
    """A tokenizer cannot be trained, serialized or restored."""


class CodecError(MbtError):
    """A tensor message cannot be decoded: unknown dtype, bad shape, or a size mismatch."""


class ArtifactError(MbtError):
    """An exported artifact (branch or trunk file, manifest) is missing or does not match."""


class SignatureError(ArtifactError):
    """A manifest (or another signed document) is not signed by enough trusted keys, is
    expired, or is older than (or equivocates with) one already accepted."""


class TrustRootError(SignatureError):
    """A trust root cannot be read, is not signed as the rotation rules require, or expired."""


class RosterError(SignatureError):
    """A roster of allowed node ids cannot be read, is not signed by trusted keys, or expired."""


class CertificateError(MbtError):
    """A TLS certificate or key is unreadable, mismatched, expired or not from the cluster CA."""


class NoBranchAvailable(MbtError):
    """No branch of a layer is left to aggregate (all masked, failed or rejected)."""


class QuorumNotReached(MbtError):
    """Fewer branches of a layer answered (and passed the output checks) than required."""


class SessionRefused(MbtError):
    """A node refuses a session step; the message never names a session id (ids are secrets
    of their gateway: whoever knew one could try to use it)."""


class CacheBehind(SessionRefused):
    """The cache holds ``length`` positions, fewer than the step assumed: replay from there."""

    def __init__(self, message: str, length: int) -> None:
        super().__init__(message)
        self.length = length


class OutOfContext(SessionRefused):
    """The step reaches past the model's context window."""


class LimitExceeded(SessionRefused):
    """A node-wide limit or a caller's quota is full; ``limit`` is its flag-style name."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class NotSessionOwner(SessionRefused):
    """The session was opened by another caller (another certificate, or another secret)."""


class SessionEnded(SessionRefused):
    """The session was ended by its owner; a late step must not open it again."""
