"""The dev cluster's config files (kubeconfigs, containerd, CNI, kubelet, kube-proxy, CoreDNS,
registry), written from the layout. A file is rewritten only when its content changes."""

from __future__ import annotations

import json
from pathlib import Path

from layout import (
    API_SERVICE_IP,
    BRIDGE,
    CLUSTER_DOMAIN,
    NODE_IP,
    NODE_NAME,
    PAUSE_IMAGE,
    POD_CIDR,
    PORTS,
    Layout,
)
from pki import ensure_pki

HERE = Path(__file__).resolve().parent
CNI_BIN = "/usr/lib/cni"


def write_if_changed(path: Path, text: str) -> None:
    """Write only what changed: kube-proxy exits, and containerd reloads CNI, when a config file
    they watch is written, even with the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def _kubeconfig(layout: Layout, user: str, cert: str) -> None:
    write_if_changed(layout.kubeconfig(user), f"""apiVersion: v1
kind: Config
clusters:
- name: faster-qat-dev
  cluster:
    server: {layout.server}
    certificate-authority: {layout.pki / 'ca.crt'}
users:
- name: {user}
  user:
    client-certificate: {layout.pki / f'{cert}.crt'}
    client-key: {layout.pki / f'{cert}.key'}
contexts:
- name: {user}@faster-qat-dev
  context: {{cluster: faster-qat-dev, user: {user}}}
current-context: {user}@faster-qat-dev
""")


def write_configs(layout: Layout, binaries: Path) -> None:
    layout.state.mkdir(parents=True, exist_ok=True)
    ensure_pki(layout.pki, NODE_NAME, NODE_IP, API_SERVICE_IP)
    for user, cert in (("admin", "admin"), ("controller-manager", "controller-manager"),
                       ("scheduler", "scheduler"), ("kubelet", "kubelet-client"), ("kube-proxy", "kube-proxy"),
                       ("coredns", "coredns")):
        _kubeconfig(layout, user, cert)
    conf = layout.state / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    write_if_changed(conf / "containerd.toml", _containerd_toml(layout))
    write_if_changed(layout.state / "cni" / "net.d" / "10-faster-qat.conflist", json.dumps({
        "cniVersion": "0.4.0", "name": "faster-qat", "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(layout.state / "cni" / "ipam"),
                      "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]], "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ]}, indent=2) + "\n")
    write_if_changed(conf / "kubelet.yaml", _kubelet_yaml(layout))
    write_if_changed(conf / "kube-proxy.yaml", f"""apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {layout.kubeconfig('kube-proxy')}}}
mode: iptables
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_CIDR}
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:{PORTS['kube-proxy-healthz']}
metricsBindAddress: 127.0.0.1:{PORTS['kube-proxy-metrics']}
nodePortAddresses: ["{NODE_IP}/32"]
# 0: leave the machine's conntrack settings as they are (the VM is shared)
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
""")
    write_if_changed(conf / "Corefile", f"""{CLUSTER_DOMAIN}:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{PORTS['coredns-health']}
    ready 127.0.0.1:{PORTS['coredns-ready']}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {layout.kubeconfig('coredns')} coredns@faster-qat-dev
        pods insecure
        fallthrough in-addr.arpa
    }}
    cache 5
}}
.:53 {{
    bind {NODE_IP}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
""")
    write_if_changed(conf / "registry.yml", f"""version: 0.1
log: {{level: info, formatter: text}}
storage:
  filesystem: {{rootdirectory: {layout.state / 'registry'}}}
  delete: {{enabled: true}}
http:
  addr: {layout.registry}
  headers: {{X-Content-Type-Options: [nosniff]}}
""")
    write_if_changed(conf / "bootstrap.yaml", (HERE / "bootstrap.yaml").read_text())


def _containerd_toml(layout: Layout) -> str:
    return f"""version = 2
root = "{layout.state / 'containerd'}"
state = "{layout.run / 'containerd'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{layout.containerd_socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  enable_unprivileged_ports = false
  # This VM withholds CAP_SYS_RESOURCE even from root, so no process may lower its
  # oom_score_adj: the kubelet asks -998 for sandboxes and runc fails ("failed to update
  # /proc/self/oom_score_adj: Permission denied"). Clamp to containerd's own score instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{layout.state / 'cni' / 'net.d'}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{layout.registry}"]
    endpoint = ["http://{layout.registry}"]
"""


def _kubelet_yaml(layout: Layout) -> str:
    pki = layout.pki
    return f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: {PORTS['kubelet']}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {PORTS['kubelet-healthz']}
tlsCertFile: {pki / 'kubelet-server.crt'}
tlsPrivateKeyFile: {pki / 'kubelet-server.key'}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {pki / 'ca.crt'}}}
authorization: {{mode: Webhook}}
containerRuntimeEndpoint: unix://{layout.containerd_socket}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
clusterDNS: ["{NODE_IP}"]
clusterDomain: {CLUSTER_DOMAIN}
resolvConf: {layout.state / 'conf' / 'resolv.conf'}
serializeImagePulls: false
runtimeRequestTimeout: 10m
# The disk is shared with other work: no evictions and no image GC because of it.
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
syncFrequency: 10s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 10s
"""
