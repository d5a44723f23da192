"""The project's error tree.

    MbtError
    ├── CheckpointError      a checkpoint file is missing, truncated, corrupt or mismatched
    ├── TokenizerError       a tokenizer cannot be trained, saved or loaded
    ├── CodecError           a wire tensor is malformed (dtype, shape, size, compression)
    ├── ArtifactError        an exported artifact is missing, altered or malformed
    │   └── SignatureError   a manifest signature is missing, untrusted, expired or rolled back
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
    """A manifest is not signed by enough trusted keys, is expired, or is older than accepted."""


class NoBranchAvailable(MbtError):
    """No branch of a layer is left to aggregate (all masked, failed or rejected)."""


class QuorumNotReached(MbtError):
    """Fewer branches of a layer answered (and passed the output checks) than required."""
