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
    ├── NodeCallError        a call to a node failed, as the gateway's client saw it (one table
    │   │                    in ``mbt_aggregator.client`` maps gRPC codes to these kinds)
    │   ├── NodeUnavailable  unreachable, not serving, or the stream broke
    │   ├── NodeTimeout      no reply within the deadline
    │   ├── NodeOverloaded   the node's limits or the caller's quota are full
    │   ├── NodeFailed       the node failed the call (internal error, cancelled)
    │   └── NodeRefused      the node refused this request (the node itself may be fine)
    │       ├── CacheGap     its cache holds ``length`` positions (also a ``CacheBehind``)
    │       └── SessionGone  not sent: the generation ended (also a ``SessionEnded``)
    ├── InvalidRequest       a client's request breaks the gateway's limits or is malformed
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


class NodeCallError(MbtError):
    """A call to a node failed. ``status`` is the wire's name for what happened, kept for
    messages and metrics; code branches on the kind (the class), never on that name."""

    status = "UNKNOWN"

    def __init__(self, address: str, details: str, status: str | None = None) -> None:
        self.status = status or type(self).status
        # Not super(): a kind that is also a SessionRefused kind (CacheGap) has a base whose
        # __init__ takes other arguments; the message is set here for every kind alike.
        MbtError.__init__(self, f"{address}: {self.status}: {details}")
        self.address = address
        self.details = details


class NodeUnavailable(NodeCallError):
    """The node cannot be reached, is not serving, or its stream broke."""

    status = "UNAVAILABLE"


class NodeTimeout(NodeCallError):
    """No reply within the deadline: the policy's time for this call is spent."""

    status = "DEADLINE_EXCEEDED"


class NodeOverloaded(NodeCallError):
    """The node's limits or this caller's quota on it are full."""

    status = "RESOURCE_EXHAUSTED"


class NodeFailed(NodeCallError):
    """The node failed the call itself (an internal error, a cancelled call)."""

    status = "INTERNAL"


class NodeRefused(NodeCallError):
    """The node refused this request; that says nothing against the node itself."""

    status = "FAILED_PRECONDITION"


class CacheGap(NodeRefused, CacheBehind):
    """The node's cache holds ``length`` positions, fewer than the step assumed: replay from
    there. The gateway's view of the node's :class:`CacheBehind`."""

    def __init__(self, address: str, details: str, length: int) -> None:
        super().__init__(address, details)
        self.length = length


class SessionGone(NodeRefused, SessionEnded):
    """Not sent: the session's generation has ended (a late hedge, failover or replay would
    open it again on a node that the end has passed already)."""


# Failures that say something about the node (down, slow, overloaded, broken): it is benched
# for a while. A refusal of the request itself says nothing of the kind.
NODE_TROUBLE: tuple[type[NodeCallError], ...] = (
    NodeUnavailable,
    NodeTimeout,
    NodeOverloaded,
    NodeFailed,
)


class InvalidRequest(MbtError):
    """A client's request breaks the gateway's limits or cannot be served as asked (an empty
    prompt, too many tokens, a bad sampling setting)."""
