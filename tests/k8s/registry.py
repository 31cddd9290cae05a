"""A small image in the dev cluster's registry, pushed through the registry's own HTTP API (the
OCI distribution protocol: blob uploads, then the manifest), so a test gets a real manifest
digest without a Docker engine.

The image is Debian's busybox-static (one static binary with sh, nc, httpd, sleep...): the
package is fetched once with `apt-get download` into the cache, never installed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def busybox_binary(cache: Path) -> Path:
    """bin/busybox of Debian's busybox-static, downloaded and unpacked once."""
    target = cache / "busybox" / "root" / "bin" / "busybox"
    if target.is_file():
        return target
    work = cache / "busybox"
    work.mkdir(parents=True, exist_ok=True)
    debs = sorted(work.glob("busybox-static_*.deb"))
    if not debs:
        # _apt cannot write into a root-owned cache: download as root, as apt warns it does.
        done = subprocess.run(["apt-get", "download", "busybox-static"], cwd=work, capture_output=True, text=True)
        debs = sorted(work.glob("busybox-static_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download busybox-static failed: {done.stderr.strip()[-300:]}")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(work / "root")], check=True)
    return target


def busybox_layer(busybox: Path) -> bytes:
    """A gzipped tar: /bin/busybox, a link per applet, /tmp. Same bytes every time (fixed times,
    owners, gzip header), so the image's digest is stable."""
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind in (("bin", tarfile.DIRTYPE), ("tmp", tarfile.DIRTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = busybox.stat().st_size, 0o755
        with busybox.open("rb") as handle:
            tar.addfile(info, handle)
        for applet in sorted(set(applets) - {"busybox"}):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return gzip.compress(raw.getvalue(), mtime=0)


def _request(method: str, url: str, body: bytes | None = None, content_type: str | None = None):
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    return urllib.request.urlopen(request, timeout=60)


def push_blob(registry: str, repository: str, data: bytes) -> str:
    digest = _sha256(data)
    base = f"http://{registry}/v2/{repository}/blobs"
    try:
        _request("HEAD", f"{base}/{digest}")
        return digest  # already there
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise
    with _request("POST", f"{base}/uploads/") as started:
        location = started.headers["Location"]
    if location.startswith("/"):
        location = f"http://{registry}{location}"
    separator = "&" if "?" in location else "?"
    _request("PUT", f"{location}{separator}digest={digest}", data, "application/octet-stream").close()
    return digest


def push_image(registry: str, repository: str, tag: str, layer: bytes, command: list[str]) -> str:
    """Push a one-layer image; returns `registry/repository@sha256:<manifest digest>` as the
    registry reports it (Docker-Content-Digest)."""
    diff_id = _sha256(gzip.decompress(layer))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": ["PATH=/bin"], "Cmd": command},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}, sort_keys=True).encode()
    layer_digest = push_blob(registry, repository, layer)
    config_digest = push_blob(registry, repository, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
    }, sort_keys=True).encode()
    with _request("PUT", f"http://{registry}/v2/{repository}/manifests/{tag}", manifest, OCI_MANIFEST) as answer:
        digest = answer.headers["Docker-Content-Digest"]
    if digest != _sha256(manifest):
        raise RuntimeError(f"the registry answered digest {digest} for a manifest of digest {_sha256(manifest)}")
    return f"{registry}/{repository}@{digest}"


def busybox_image(registry: str, cache: Path | None = None) -> str:
    cache = cache or Path(os.environ.get("FASTER_QAT_CACHE", "/var/cache/faster-qat"))
    return push_image(registry, "faster-qat/busybox", "test", busybox_layer(busybox_binary(cache)), ["sh"])
