"""Build, push and lock the stage images through the Docker SDK (`python -m pipeline images ...`).

Each image is `images/<name>/Dockerfile`, built from a context that holds only what the image
needs (its folder, `stages/`, `pyproject.toml`), so nothing else of the checkout (runs, venvs,
.git) is sent to the engine. Every image carries labels with the code version of each stage
kind it was built from; `--runtime docker` refuses an image whose code differs from the
checkout's, so a stage never runs stale code under a fresh fingerprint.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.kinds import STAGE_KINDS
from pipeline.errors import BackendError, ConfigError
from pipeline.fingerprint import code_version
from pipeline.image_lock import (
    PROJECT_ROOT,
    ImageRef,
    LockEntry,
    LockFile,
    read_lock,
    write_lock,
)

IMAGES_DIR = PROJECT_ROOT / "images"
CODE_LABEL = "org.faster-qat.code."  # + stage kind -> code_version(kind)
NAME_LABEL = "org.faster-qat.image"
_CONTEXT_FILES = ("pyproject.toml", "README.md")
Echo = Callable[[str], None]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the engine colours RUN steps' stderr


def image_names(images_dir: Path = IMAGES_DIR) -> list[str]:
    return sorted(p.parent.name for p in images_dir.glob("*/Dockerfile"))


def code_labels() -> dict[str, str]:
    return {CODE_LABEL + kind: code_version(kind) for kind in STAGE_KINDS}


def docker_client() -> Any:
    """The Docker engine from the environment (DOCKER_HOST or the local socket), checked."""
    try:
        import docker
    except ImportError:
        raise BackendError("the docker SDK is not installed: `pip install docker`") from None
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as error:
        raise BackendError(
            f"no Docker engine answers ({type(error).__name__}: {str(error)[:120]}); start dockerd "
            "or set DOCKER_HOST, or use --runtime process"
        ) from None
    return client


def build_context(name: str, images_dir: Path = IMAGES_DIR) -> io.BytesIO:
    """A tar of images/<name>/, the data plane (stages/ and the contract/ it runs on) and the
    packaging files, at their project paths."""
    root = images_dir.parent
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for relative in (f"{images_dir.name}/{name}", "contract", "stages", *_CONTEXT_FILES):
            path = root / relative
            if path.exists():
                tar.add(path, arcname=relative, filter=_clean)
    buffer.seek(0)
    return buffer


def _clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if "__pycache__" in info.name.split("/") or info.name.endswith(".pyc"):
        return None
    # Same bytes for the same sources: the engine's layer cache hits on rebuilds.
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


@dataclass
class BuiltImage:
    name: str
    ref: ImageRef  # repository:tag as built
    image_id: str


def build_image(
    client: Any,
    name: str,
    ref: ImageRef,
    echo: Echo,
    build_args: dict[str, str] | None = None,
    network: str | None = None,
    no_cache: bool = False,
    images_dir: Path = IMAGES_DIR,
) -> BuiltImage:
    """Build images/<name>/Dockerfile as `ref` (its repository:tag), streaming the build log."""
    dockerfile = images_dir / name / "Dockerfile"
    if not dockerfile.is_file():
        known = ", ".join(image_names(images_dir)) or "none"
        raise BackendError(f"images build {name}: no {dockerfile}; images: {known}")
    stream = client.api.build(
        fileobj=build_context(name, images_dir), custom_context=True,
        dockerfile=f"{images_dir.name}/{name}/Dockerfile", tag=ref.name,
        buildargs=build_args or {}, network_mode=network, nocache=no_cache, rm=True,
        forcerm=True, labels={NAME_LABEL: name, **code_labels()}, decode=True,
    )
    image_id = None
    pending = ""  # the engine splits lines across chunks: print whole lines only
    for chunk in stream:
        if "error" in chunk:
            detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
            raise BackendError(f"images build {name}: {_ANSI.sub('', detail).strip().splitlines()[-1]}")
        pending += _ANSI.sub("", chunk.get("stream", ""))
        *lines, pending = pending.split("\n")
        for line in lines:
            if line.strip():
                echo(f"[{name}] {line.rstrip()}")
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
    if pending.strip():
        echo(f"[{name}] {pending.rstrip()}")
    if image_id is None:
        image_id = client.images.get(ref.name).id
    echo(f"[{name}] built {ref.name} ({image_id})")
    return BuiltImage(name, ref, image_id)


def push_image(client: Any, name: str, ref: ImageRef, echo: Echo) -> str:
    """Push repository:tag; returns the registry's manifest digest."""
    last_status = ""
    digest = None
    try:
        for chunk in client.api.push(ref.repository, tag=ref.tag or "latest", stream=True, decode=True):
            if "error" in chunk:
                raise BackendError(f"images push {name}: {chunk['error'].strip().splitlines()[-1]}")
            status = " ".join(str(chunk.get(k, "")) for k in ("id", "status", "progress")).strip()
            if status and status != last_status and "progress" not in chunk:
                echo(f"[{name}] {status}")
            last_status = status
            digest = (chunk.get("aux") or {}).get("Digest", digest)
    except BackendError:
        raise
    except Exception as error:  # the engine refused before streaming (unknown image, auth)
        raise BackendError(f"images push {name}: {type(error).__name__}: {str(error)[:160]}") from None
    if digest is None:
        raise BackendError(f"images push {name}: the registry returned no digest")
    echo(f"[{name}] pushed {ref.name}@{digest}")
    return digest


def lock_entry(client: Any, name: str, ref: ImageRef) -> LockEntry:
    """Pin the local image `ref` names: its registry digest if it has one, else its image id."""
    try:
        image = client.images.get(ref.name)
    except Exception:
        raise BackendError(
            f"images lock {name}: no local image {ref.name}; run `python -m pipeline images build {name}`"
        ) from None
    labels = image.attrs.get("Config", {}).get("Labels") or {}
    code = {k[len(CODE_LABEL):]: v for k, v in labels.items() if k.startswith(CODE_LABEL)}
    for repo_digest in image.attrs.get("RepoDigests") or []:
        repository, _, digest = repo_digest.partition("@")
        if repository == ref.repository:
            return LockEntry(ref=str(ref.pinned(digest)), pinned_by="registry-digest", code=code)
    return LockEntry(ref=str(ref.pinned(image.id)), pinned_by="image-id", code=code)


def update_lock(path: Path, entries: dict[str, LockEntry]) -> LockFile:
    lock = read_lock(path) if path.is_file() else LockFile()
    lock.images.update(entries)
    write_lock(path, lock)
    return lock


def select(names: Iterable[str], refs: dict[str, str], images_dir: Path = IMAGES_DIR) -> dict[str, ImageRef]:
    """The images to act on (default: every image with a Dockerfile), by name -> repository:tag."""
    wanted = list(names) or [n for n in image_names(images_dir) if n in refs]
    selected = {}
    for name in wanted:
        if name not in refs:
            raise ConfigError(f"images: '{name}' is not a key of images.refs ({', '.join(sorted(refs))})")
        ref = ImageRef.parse(refs[name])
        selected[name] = ImageRef(ref.repository, ref.tag or "latest")
    return selected
