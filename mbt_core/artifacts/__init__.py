"""THE SIGNED MODEL ON DISK: a manifest of per-branch files, its detached signatures, and loading
that verifies before it trusts.

``mbt export`` writes a trunk file and one file per branch, each hashed in the manifest (with
calibrated output-norm bounds); loaders check signatures, expiry and rollback against the bytes
they then load, so what was checked is what runs.
"""

from mbt_core.artifacts.export import export_artifacts
from mbt_core.artifacts.load import (
    Verified,
    load_model_from_artifacts,
    load_verified_artifacts,
    verify_artifacts,
)
from mbt_core.artifacts.manifest import (
    ArtifactEntry,
    Manifest,
    NormBound,
    manifest_digest,
    read_manifest,
)
from mbt_core.artifacts.signatures import check_signatures, sign_manifest

__all__ = [
    "ArtifactEntry",
    "Manifest",
    "NormBound",
    "Verified",
    "check_signatures",
    "export_artifacts",
    "load_model_from_artifacts",
    "load_verified_artifacts",
    "manifest_digest",
    "read_manifest",
    "sign_manifest",
    "verify_artifacts",
]
