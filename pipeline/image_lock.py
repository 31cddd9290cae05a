"""Image references and the lock file that pins them by digest (no Docker needed here).

`images/lock.yaml` maps an image name (a key of `images.refs`) to the reference of the image
that `python -m pipeline images lock` found for it:

    images:
      cpu:
        ref: faster-qat-cpu:dev@sha256:<64 hex>
        pinned_by: image-id        # or registry-digest
        code: {probe: <hash>, ...}   # stages code the image was built from (informative)

`pinned_by: registry-digest` is a manifest digest a registry serves (any cluster can pull it);
`image-id` is the local image's content id (`docker images --no-trunc`): it pins the exact
image on the machine that built it, and `--runtime docker` runs it, but no registry knows it.

Loading a config fills every `images.refs` entry that carries no digest from the lock entry
of the same name when both name the same repository; a ref that already has a digest is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contract.validation import one_line

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LOCK_FILE = "images/lock.yaml"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

LOCK_HEADER = """\
# Container images pinned by digest: image name -> reference (repository:tag@sha256:...).
# Written by `python -m pipeline images lock`; do not edit by hand.
# The config loader fills each images.refs entry without a digest from the entry of the same
# name (same repository). pinned_by: registry-digest = a manifest digest a registry serves;
# image-id = the local image id: runs with --runtime docker here, cannot be pulled elsewhere
# (`images push` then `images lock` pins the registry digest).
"""


class ImageRefError(ValueError):
    """A malformed image reference or lock file; the message is one line."""


@dataclass(frozen=True)
class ImageRef:
    repository: str
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        name, _, digest = text.partition("@")
        # A tag follows the last ':' only when it comes after the last '/' (host:port/repo).
        repository, tag = name, None
        colon = name.rfind(":")
        if colon > name.rfind("/"):
            repository, tag = name[:colon], name[colon + 1:]
        if not repository or (tag is not None and not tag) or any(c.isspace() for c in text):
            raise ImageRefError(f"'{text}' is not an image reference (repository[:tag][@sha256:...])")
        if digest and not _DIGEST.match(digest):
            raise ImageRefError(f"'{text}': the digest must be sha256: and 64 hex digits")
        return cls(repository, tag, digest or None)

    @property
    def name(self) -> str:
        """repository[:tag], what `docker build -t` and `docker push` take."""
        return f"{self.repository}:{self.tag}" if self.tag else self.repository

    def pinned(self, digest: str) -> ImageRef:
        return ImageRef(self.repository, self.tag, digest)

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}" if self.digest else self.name


class LockEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ref: str = Field(description="repository[:tag]@sha256:<digest>")
    pinned_by: Literal["registry-digest", "image-id"] = Field(
        description="What the digest is: a registry manifest digest, or the local image id."
    )
    code: dict[str, str] = Field(
        default_factory=dict, description="Stage kind -> code version the image was built from."
    )


class LockFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: dict[str, LockEntry] = Field(default_factory=dict)


def resolve_lock_path(path: str | Path) -> Path:
    """Relative lock paths are relative to the project root (where `images/` lives)."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path


def read_lock(path: Path) -> LockFile:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ImageRefError(f"{path}: invalid YAML: {str(error).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError, RecursionError) as error:
        raise ImageRefError(f"{path}: cannot read: {error}") from None
    try:
        lock = LockFile.model_validate(raw)
    except ValidationError as error:
        raise ImageRefError(f"{path}: {one_line(error)}") from None
    for name, entry in lock.images.items():
        ref = ImageRef.parse(entry.ref)
        if ref.digest is None:
            raise ImageRefError(f"{path}: images.{name}.ref: '{entry.ref}' has no @sha256: digest")
    return lock


def write_lock(path: Path, lock: LockFile) -> None:
    from contract.files import write_atomic

    body = yaml.safe_dump(lock.model_dump(mode="json"), sort_keys=True)
    write_atomic(path, LOCK_HEADER + body)


def pin_refs(refs: dict[str, str], lock: LockFile) -> dict[str, str]:
    """refs with every digest-less entry replaced by its lock entry (same repository)."""
    pinned = dict(refs)
    for name, text in refs.items():
        ref = ImageRef.parse(text)
        entry = lock.images.get(name)
        if ref.digest or entry is None:
            continue
        locked = ImageRef.parse(entry.ref)
        if locked.repository == ref.repository:
            pinned[name] = str(locked)
    return pinned
