"""Where the dev cluster keeps things, and the addresses it uses (one cluster per machine)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RELEASE = "v1.34.4"
NODE_NAME = "fq-node"
BRIDGE = "fq-cni0"
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"  # the bridge's address: the node's InternalIP, kubelet and DNS listen here
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
CLUSTER_DOMAIN = "cluster.local"
PORTS = {
    "etcd": 32379, "etcd-peer": 32380, "apiserver": 36443, "controller-manager": 36257,
    "scheduler": 36259, "kubelet": 10250, "kubelet-healthz": 36248, "kube-proxy-healthz": 36256,
    "kube-proxy-metrics": 36249, "coredns-health": 36280, "coredns-ready": 36281, "registry": 35000,
}
PAUSE_IMAGE = "faster-qat.dev/pause:3.10"


@dataclass(frozen=True)
class Layout:
    state: Path
    cache: Path
    release: str

    @classmethod
    def from_env(cls) -> Layout:
        return cls(Path(os.environ.get("FASTER_QAT_K8S_STATE", "/var/lib/faster-qat/k8s-dev")),
                   Path(os.environ.get("FASTER_QAT_CACHE", "/var/cache/faster-qat")),
                   os.environ.get("K8S_RELEASE", RELEASE))

    @property
    def bin_dir(self) -> Path:
        return self.cache / f"k8s-{self.release}" / "bin"

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def run(self) -> Path:
        return self.state / "run"

    @property
    def containerd_socket(self) -> Path:
        return self.run / "containerd.sock"

    def pid_file(self, name: str) -> Path:
        self.run.mkdir(parents=True, exist_ok=True)
        return self.run / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def kubeconfig(self, user: str) -> Path:
        return self.state / "kubeconfig" / f"{user}.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{PORTS['apiserver']}"

    @property
    def registry(self) -> str:
        return f"127.0.0.1:{PORTS['registry']}"

    def info(self) -> dict[str, str]:
        return {"kubeconfig": str(self.kubeconfig("admin")), "server": self.server, "registry": self.registry,
                "node": NODE_NAME, "node_ip": NODE_IP, "state": str(self.state), "release": self.release,
                "bin": str(self.bin_dir), "ca": str(self.pki / "ca.crt")}
