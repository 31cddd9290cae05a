"""The dev cluster's own PKI, made with the openssl command: one CA, the API server's serving
certificate, a client certificate per component (its user and group are what RBAC sees), the
kubelet's serving certificate, and the service-account signing key pair. Made once per state
directory; a file that exists is kept, so a restarted cluster keeps its identities."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DAYS = 3650


@dataclass(frozen=True)
class Cert:
    name: str
    common_name: str
    organization: str | None = None
    server_names: list[str] = field(default_factory=list)  # "IP:..." or "DNS:..."
    client: bool = True


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-300:]}")


def _key(path: Path) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path))
    path.chmod(0o600)


def ensure_ca(pki: Path) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    if (pki / "ca.crt").is_file():
        return
    _key(pki / "ca.key")
    _openssl("req", "-x509", "-new", "-key", str(pki / "ca.key"), "-days", str(DAYS), "-subj",
             "/CN=faster-qat-dev-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
             "-out", str(pki / "ca.crt"))


def ensure_cert(pki: Path, cert: Cert) -> None:
    crt, key = pki / f"{cert.name}.crt", pki / f"{cert.name}.key"
    if crt.is_file() and key.is_file():
        return
    _key(key)
    subject = f"/CN={cert.common_name}" + (f"/O={cert.organization}" if cert.organization else "")
    usages = ["clientAuth"] if cert.client else []
    if cert.server_names:
        usages.append("serverAuth")
    extensions = pki / f"{cert.name}.ext"
    lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={','.join(usages)}"]
    if cert.server_names:
        lines.append(f"subjectAltName={','.join(cert.server_names)}")
    extensions.write_text("\n".join(lines) + "\n")
    csr = pki / f"{cert.name}.csr"
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
             "-CAcreateserial", "-days", str(DAYS), "-extfile", str(extensions), "-out", str(crt))
    csr.unlink()
    extensions.unlink()


def ensure_service_account_keys(pki: Path) -> None:
    if (pki / "sa.key").is_file() and (pki / "sa.pub").is_file():
        return
    _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
    (pki / "sa.key").chmod(0o600)
    _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


def ensure_pki(pki: Path, node_name: str, node_ip: str, service_ip: str) -> None:
    ensure_ca(pki)
    ensure_service_account_keys(pki)
    api_names = ["IP:127.0.0.1", f"IP:{node_ip}", f"IP:{service_ip}", "DNS:localhost", "DNS:kubernetes",
                 "DNS:kubernetes.default", "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"]
    for cert in [
        Cert("apiserver", "kube-apiserver", server_names=api_names, client=False),
        Cert("admin", "kubernetes-admin", "system:masters"),
        Cert("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"),
        Cert("controller-manager", "system:kube-controller-manager"),
        Cert("scheduler", "system:kube-scheduler"),
        Cert("kube-proxy", "system:kube-proxy", "system:node-proxier"),
        Cert("coredns", "faster-qat:coredns"),
        Cert("kubelet-client", f"system:node:{node_name}", "system:nodes"),
        Cert("kubelet-server", node_name, server_names=["IP:127.0.0.1", f"IP:{node_ip}", f"DNS:{node_name}"],
             client=False),
    ]:
        ensure_cert(pki, cert)
