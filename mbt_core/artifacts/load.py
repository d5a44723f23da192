"""Verified loading of exported artifacts: signatures, expiry and rollback first, then files.

A manifest is used only once enough trusted keys signed it (PEM key files and a threshold, or a
:class:`~mbt_core.trust.root.TrustRoot`), it has not expired, and its version is neither below
nor an equivocating copy of one already accepted. Each file is hashed as it is read and parsed
from those same bytes, so what was checked is what gets loaded, and an old file mixed into a
new release fails its hash. A failure raises before anything is returned or recorded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import Tensor, nn

from mbt_core.artifacts.layout import (
    FILE_FORMAT_VERSION,
    TRUNK_FORMAT,
    branch_reference,
    join_state,
    trunk_reference,
)
from mbt_core.artifacts.manifest import MANIFEST_FILE, ArtifactEntry, Manifest, read_manifest
from mbt_core.artifacts.rollback import default_state_file, record_accepted, rollback_problem
from mbt_core.artifacts.signatures import check_signatures
from mbt_core.errors import ArtifactError, CheckpointError, SignatureError, TokenizerError
from mbt_core.jsonfields import format_time
from mbt_core.model.blocks import Branch
from mbt_core.model.checkpoint import Checkpoint, check_state, tokenizer_eos
from mbt_core.model.lm import MBTLanguageModel
from mbt_core.model.tensorfile import metadata_of, read_into, tensors_of
from mbt_core.model.tokenizer import Tokenizer, vocabulary_problem
from mbt_core.trust.root import Trust, TrustRoot, trusted_keys_and_threshold

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows, where the resolve check remains
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO planted as an artifact must not hang


@dataclass(frozen=True)
class Problem:
    """One thing verification found wrong, and the error it raises in library use."""

    message: str
    error: type[ArtifactError] = ArtifactError


@dataclass(frozen=True)
class Verification:
    manifest: Manifest | None  # None when manifest.json itself is missing or invalid
    valid_key_ids: tuple[str, ...]
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> Manifest:
        """The manifest when every check passed, else the first problem's error."""
        if self.problems or self.manifest is None:
            first = self.problems[0]
            more = len(self.problems) - 1
            raise first.error(first.message + (f" (and {more} more problem(s))" if more else ""))
        return self.manifest


@dataclass(frozen=True)
class Trunk:
    """Embeddings, final norm and aggregation weights (full-model key names), and tokenizer."""

    tensors: dict[str, Tensor]
    tokenizer: Tokenizer
    info: dict[str, str]


@dataclass(frozen=True)
class Verified:
    """What :func:`load_verified_artifacts` loaded, all from one verified manifest."""

    manifest: Manifest
    branches: dict[tuple[int, int], Branch]
    trunk: Trunk | None


def verify_artifacts(
    directory: Path,
    trusted_keys: Trust,
    threshold: int = 1,
    state_file: Path | None = None,
    *,
    now: datetime | None = None,
    check_files: bool = True,
) -> Verification:
    """Every check at once, one problem per line; reads the rollback state, never writes it.

    With a trust root, its keys and threshold apply (``threshold`` may only raise it).
    """
    directory = Path(directory)
    trusted, threshold = trusted_keys_and_threshold(trusted_keys, threshold)
    try:
        manifest = read_manifest(directory)
    except ArtifactError as exc:
        return Verification(None, (), (Problem(str(exc)),))
    signatures = check_signatures(directory, manifest, trusted, threshold)
    problems = [Problem(p, SignatureError) for p in signatures.problems]
    if isinstance(trusted_keys, TrustRoot) and trusted_keys.expired(now):
        problems.append(
            Problem(f"{trusted_keys.describe()}: expired; a newer root is needed", SignatureError)
        )
    expired = expiry_problem(directory, manifest, now)
    if expired is not None:
        problems.append(expired)
    try:
        rollback = rollback_problem(state_file or default_state_file(), manifest)
        if rollback is not None:
            problems.append(Problem(f"{directory / MANIFEST_FILE}: {rollback}", SignatureError))
    except SignatureError as exc:  # an unreadable state file fails closed
        problems.append(Problem(str(exc), SignatureError))
    if check_files:
        problems.extend(file_problems(directory, manifest))
    return Verification(manifest, signatures.valid_key_ids, tuple(problems))


def load_verified_manifest(
    directory: Path,
    trusted_keys: Trust,
    threshold: int = 1,
    state_file: Path | None = None,
    *,
    now: datetime | None = None,
    record: bool = True,
) -> Manifest:
    """The manifest, once signed by ``threshold`` trusted keys, unexpired and not rolled back.

    With ``record``, its version becomes the new floor for its model id in ``state_file``
    (re-checked under the state's lock). Artifact files are not read here:
    :func:`load_branch` and :func:`load_trunk` check them; :func:`load_verified_artifacts`
    records only once they loaded too.
    """
    state = state_file or default_state_file()
    verification = verify_artifacts(
        directory, trusted_keys, threshold, state, now=now, check_files=False
    )
    manifest = verification.raise_for_problems()
    if record:
        record_accepted(state, manifest, now=now)
    return manifest


def load_verified_artifacts(
    directory: Path,
    trusted_keys: Trust,
    threshold: int = 1,
    state_file: Path | None = None,
    *,
    branches: Sequence[tuple[int, int]] = (),
    trunk: bool = False,
    now: datetime | None = None,
) -> Verified:
    """The manifest and the parts a process serves, recorded as accepted only once all loaded.

    A node asks for its ``branches``, a gateway for the ``trunk``: a release whose manifest
    verifies but whose files do not (an old branch file mixed in, a truncated trunk) raises
    and leaves the rollback state as it was.
    """
    state = state_file or default_state_file()
    manifest = load_verified_manifest(
        directory, trusted_keys, threshold, state, now=now, record=False
    )
    loaded = {(li, b): load_branch(directory, manifest, li, b) for li, b in branches}
    trunk_files = load_trunk(directory, manifest) if trunk else None
    record_accepted(state, manifest, now=now)
    return Verified(manifest, loaded, trunk_files)


def expiry_problem(
    directory: Path, manifest: Manifest, now: datetime | None = None
) -> Problem | None:
    now = now or datetime.now(UTC)
    if now < manifest.expires_at:
        return None
    return Problem(
        f"{Path(directory) / MANIFEST_FILE}: expired at {format_time(manifest.expires_at)} "
        f"(now {format_time(now)})",
        SignatureError,
    )


def file_problems(directory: Path, manifest: Manifest) -> list[Problem]:
    """Read every artifact the manifest lists; one problem per missing or altered file."""
    problems = []
    for entry in manifest.artifacts:
        try:
            read_artifact(directory, entry)
        except ArtifactError as exc:
            problems.append(Problem(str(exc)))
    return problems


def read_artifact(directory: Path, entry: ArtifactEntry) -> bytearray:
    """The file's bytes, read once; refused unless size and SHA-256 match ``entry``."""
    path = _artifact_path(Path(directory), entry.name)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (listed in {MANIFEST_FILE})") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArtifactError(
                f"{path}: is a symbolic link; artifacts must be plain files"
            ) from None
        raise ArtifactError(f"{path}: cannot open ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path}: not a regular file")
        if st.st_size != entry.size:
            raise ArtifactError(f"{path}: size {st.st_size} bytes, manifest says {entry.size}")
        try:
            data = read_into(fh.fileno(), entry.size)  # one buffer: the tensors are views of it
        except ValueError as exc:
            raise ArtifactError(f"{path}: changed while read ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise ArtifactError(
            f"{path}: SHA-256 mismatch (manifest {entry.sha256}, file {digest}); "
            "the file was altered or corrupted"
        )
    return data


def load_branch(directory: Path, manifest: Manifest, layer: int, branch: int) -> Branch:
    """A lone branch, as a node hosts it; ``manifest`` must come from a verified load."""
    entry = manifest.branch(layer, branch)
    tensors = _parse_tensors(
        read_artifact(directory, entry),
        Path(directory) / entry.name,
        branch_reference(manifest.config, layer),
    )
    module = branch_reference(manifest.config, layer)
    module.load_state_dict(tensors, strict=True, assign=True)  # the parsed tensors, no copy
    return module.eval()


def load_trunk(directory: Path, manifest: Manifest) -> Trunk:
    """The trunk tensors and tokenizer; ``manifest`` must come from a verified load."""
    entry = manifest.trunk()
    path = Path(directory) / entry.name
    data = read_artifact(directory, entry)
    tensors = _parse_tensors(data, path, trunk_reference(manifest.config))
    try:
        meta = metadata_of(data)
        if meta.get("format") != TRUNK_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {TRUNK_FORMAT!r}")
        if meta.get("format_version") != str(FILE_FORMAT_VERSION):
            raise ValueError(f"format version {meta.get('format_version')!r}")
        tokenizer = Tokenizer.from_json(meta["tokenizer"], tokenizer_eos(manifest.config))
        info = json.loads(meta.get("info", "{}"))
        if not isinstance(info, dict):
            raise ValueError("info is not an object")
    except (KeyError, ValueError, TokenizerError) as exc:
        raise ArtifactError(f"{path}: invalid trunk header: {exc}") from exc
    problem = vocabulary_problem(
        tokenizer, manifest.config.vocab_size, manifest.config.kind == "sliced"
    )
    if problem:
        raise ArtifactError(f"{path}: {problem}")
    return Trunk(tensors=tensors, tokenizer=tokenizer, info=info)


def trunk_model(manifest: Manifest, trunk: Trunk) -> MBTLanguageModel:
    """The model without its branches (embeddings, final norm, head, alpha): what an
    aggregator runs itself while the branches run on nodes."""
    model = trunk_reference(manifest.config)
    model.load_state_dict(trunk.tensors, strict=True, assign=True)
    return model.eval()


def load_model_from_artifacts(
    directory: Path,
    trusted_keys: Trust,
    threshold: int = 1,
    state_file: Path | None = None,
) -> Checkpoint:
    """The whole model in one process, from a verified artifact folder.

    Every file is checked before the model is built, and the version is recorded as accepted
    only once the model loaded.
    """
    state = state_file or default_state_file()
    manifest = load_verified_manifest(directory, trusted_keys, threshold, state, record=False)
    cfg = manifest.config
    trunk = load_trunk(directory, manifest)
    branches = {}
    for li, k in enumerate(cfg.branches):
        reference = branch_reference(cfg, li)
        for b in range(k):
            entry = manifest.branch(li, b)
            data = read_artifact(directory, entry)
            branches[(li, b)] = _parse_tensors(data, Path(directory) / entry.name, reference)
    with torch.device("meta"):
        model = MBTLanguageModel(cfg)
    tensors = join_state(trunk.tensors, branches)
    _check_state(model, tensors, Path(directory))
    model.load_state_dict(tensors, strict=True, assign=True)
    model.eval()
    record_accepted(state, manifest)
    return Checkpoint(model=model, tokenizer=trunk.tokenizer, info=trunk.info)


def _artifact_path(directory: Path, name: str) -> Path:
    """``directory/name``, refused when it would resolve anywhere but directly inside."""
    path = directory / name
    if os.path.isabs(name) or path.resolve().parent != directory.resolve():
        raise ArtifactError(f"{path}: resolves outside {directory}; refused")
    return path


def _parse_tensors(data: bytearray, source: Path, reference: nn.Module) -> dict[str, Tensor]:
    try:
        tensors = tensors_of(data)  # views of the hashed bytes: what was checked is loaded
    except ValueError as exc:
        raise ArtifactError(f"{source}: not a valid safetensors file ({exc})") from exc
    _check_state(reference, tensors, source)
    return tensors


def _check_state(reference: nn.Module, tensors: dict[str, Tensor], source: Path) -> None:
    try:
        check_state(reference, tensors, str(source))
    except CheckpointError as exc:
        raise ArtifactError(str(exc)) from exc
