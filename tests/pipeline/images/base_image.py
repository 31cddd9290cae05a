"""A small base image made offline from this machine's own files, for the Docker tests.

No registry is reachable, so the tests cannot pull `python:3.11-slim`. Instead: a root
filesystem of this interpreter (its binary, standard library and shared libraries, at their
paths here), the few packages the probe stage imports (pydantic and its dependencies), and
/bin/sh for the Dockerfile's RUN steps; then `docker import`. It runs `python -m stages.probe`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Any

# What `contract` (spec, params, recipes, tracking), `stages.runtime` and `stages.probe` import outside
# the standard library.
PACKAGES = ("pydantic", "pydantic_core", "typing_extensions", "annotated_types", "typing_inspection", "xxhash", "yaml")
SITE = "/opt/site"
_SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages",
                "dist-packages", "__pycache__"}


def _interpreter() -> Path:
    return Path(getattr(sys, "_base_executable", sys.executable)).resolve()


def _shared_libraries(binary: Path) -> list[Path]:
    listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    found = []
    for line in listing.splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            found.append(Path(match.group(1)))
    return found


def _files() -> dict[str, Path]:
    """Archive path -> host file to store there (symlinks dereferenced)."""
    files: dict[str, Path] = {}
    python = _interpreter()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    binaries = [python, Path("/bin/sh").resolve()]
    for path in stdlib.rglob("*"):
        relative = path.relative_to(stdlib)
        if relative.parts and relative.parts[0] in _SKIP_STDLIB or relative.parts[0].startswith("config-"):
            continue
        if path.is_file():
            files[str(path).lstrip("/")] = path
            if path.suffix == ".so":
                binaries.append(path)
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"the test base image needs {name} installed here")
        origin = Path(spec.origin)
        top = origin.parent if origin.name == "__init__.py" else origin
        for path in [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]:
            arcname = f"{SITE}/{path.relative_to(top.parent)}".lstrip("/")
            files[arcname] = path
            if path.suffix == ".so":
                binaries.append(path)
    for binary in binaries:
        files[str(binary).lstrip("/")] = binary
        for library in _shared_libraries(binary):
            files[str(library).lstrip("/")] = library.resolve()
    return files


def _add_link(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    tar.addfile(info)


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o1777
    tar.addfile(info)


def rootfs_tar(files: dict[str, Path]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add_dir(tar, "tmp")
        for arcname, path in sorted(files.items()):
            tar.add(path, arcname=arcname, recursive=False)
        if "bin/sh" not in files:
            _add_link(tar, "bin/sh", str(Path("/bin/sh").resolve()))
        _add_link(tar, "usr/local/bin/python", str(_interpreter()))
    return buffer.getvalue()


def ensure_base_image(client: Any, repository: str = "faster-qat-testbase") -> str:
    """The base image (repository:<content hash>), imported once and reused while files match."""
    files = _files()
    digest = hashlib.sha256()
    for arcname, path in sorted(files.items()):
        stat = path.stat()
        digest.update(f"{arcname}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    name = f"{repository}:{digest.hexdigest()[:16]}"
    try:
        client.images.get(name)
        return name
    except Exception:
        pass
    client.api.import_image_from_data(
        rootfs_tar(files), repository=repository, tag=name.split(":")[1],
        changes=[f"ENV PYTHONPATH={SITE}", "ENV PATH=/usr/local/bin:/usr/bin:/bin",
                 "ENV LANG=C.UTF-8", "WORKDIR /tmp"],
    )
    return name


if __name__ == "__main__":
    import docker

    print(ensure_base_image(docker.from_env()), file=sys.stderr if os.environ.get("QUIET") else sys.stdout)
