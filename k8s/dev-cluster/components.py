"""The processes of the dev cluster, in start order: how each starts, how it is known healthy,
what it needs set up before and cleaned after. Their config files come from configs.py."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from configs import write_if_changed
from layout import (
    BRIDGE,
    CLUSTER_DOMAIN,
    NODE_IP,
    NODE_NAME,
    PAUSE_IMAGE,
    POD_CIDR,
    PORTS,
    SERVICE_CIDR,
    Layout,
)

Hook = Callable[[], None]


@dataclass
class Component:
    name: str
    argv: list[str]
    healthy: Callable[[], bool]
    start_timeout_s: float = 60
    stop_grace_s: float = 15
    env: dict[str, str] | None = None
    before_start: Hook | None = None
    after_start: Hook | None = None
    before_stop: Hook | None = None
    after_stop: Hook | None = None


def _get(url: str, context: ssl.SSLContext | None = None, timeout: float = 3) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, ""
    except (OSError, ValueError):
        return 0, ""


def admin_context(layout: Layout) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(layout.pki / "ca.crt"))
    context.load_cert_chain(str(layout.pki / "admin.crt"), str(layout.pki / "admin.key"))
    return context


def _self_signed_ok() -> ssl.SSLContext:
    # The controller-manager's and scheduler's health ports serve a certificate they make
    # themselves; only "is it up" is asked of them.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _ok(url: str, context: ssl.SSLContext | None = None) -> Callable[[], bool]:
    return lambda: _get(url, context)[0] == 200


def kubectl(layout: Layout, *args: str, input_text: str | None = None, check: bool = True) -> str:
    done = subprocess.run([str(layout.bin_dir / "kubectl"), f"--kubeconfig={layout.kubeconfig('admin')}", *args],
                          input=input_text, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise SystemExit(f"cluster: kubectl {' '.join(args)}: {done.stderr.strip()[-400:]}")
    return done.stdout


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"cluster: {' '.join(argv)}: {done.stderr.strip()[-300:]}")
    return done


# ---- node network ------------------------------------------------------------------------------
def ensure_bridge() -> None:
    """The pods' bridge with the node's address, made before the kubelet needs the node IP (the
    CNI bridge plugin reuses it). Routing between pods and Service IPs needs forwarding, and
    bridged packets must pass iptables for kube-proxy's rules to see pod-to-Service traffic."""
    if _sh("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
    if NODE_IP not in _sh("ip", "-4", "addr", "show", "dev", BRIDGE).stdout:
        _sh("ip", "addr", "add", f"{NODE_IP}/{POD_CIDR.split('/')[1]}", "dev", BRIDGE)
    _sh("ip", "link", "set", BRIDGE, "up")
    for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
        Path("/proc/sys", key).write_text("1\n")


def remove_bridge() -> None:
    _sh("ip", "link", "del", BRIDGE, check=False)


# ---- the components ------------------------------------------------------------------------------
def components(layout: Layout, binaries: Path) -> list[Component]:
    b = lambda name: str(binaries / name)  # noqa: E731
    pki, conf, state = layout.pki, layout.state / "conf", layout.state
    admin = admin_context(layout) if (layout.pki / "admin.crt").is_file() else None
    api = layout.server
    kubeconfig = layout.kubeconfig
    insecure = _self_signed_ok()
    return [
        Component("registry", ["docker-registry", "serve", str(conf / "registry.yml")],
                  _ok(f"http://{layout.registry}/v2/")),
        Component("etcd", [b("etcd"), "--name=faster-qat-dev", f"--data-dir={state / 'etcd'}",
                           f"--listen-client-urls=http://127.0.0.1:{PORTS['etcd']}",
                           f"--advertise-client-urls=http://127.0.0.1:{PORTS['etcd']}",
                           f"--listen-peer-urls=http://127.0.0.1:{PORTS['etcd-peer']}",
                           f"--initial-advertise-peer-urls=http://127.0.0.1:{PORTS['etcd-peer']}",
                           f"--initial-cluster=faster-qat-dev=http://127.0.0.1:{PORTS['etcd-peer']}",
                           "--listen-metrics-urls=", "--quota-backend-bytes=2147483648",
                           "--snapshot-count=10000", "--log-level=warn"],
                  _ok(f"http://127.0.0.1:{PORTS['etcd']}/health"), stop_grace_s=20),
        Component("kube-apiserver", [
            b("kube-apiserver"), "--bind-address=127.0.0.1", f"--secure-port={PORTS['apiserver']}",
            f"--advertise-address={NODE_IP}", f"--etcd-servers=http://127.0.0.1:{PORTS['etcd']}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", f"--client-ca-file={pki / 'ca.crt'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            # The apiserver listens on loopback only, and Endpoints may not hold a loopback
            # address: no `kubernetes` Service endpoints (pods do not call the API here).
            "--endpoint-reconciler-type=none", "--allow-privileged=true", "--profiling=false",
            f"--cert-dir={state / 'apiserver'}", "--event-ttl=1h"],
            _ok(f"{api}/readyz", admin), start_timeout_s=120, after_start=lambda: _bootstrap(layout)),
        Component("kube-controller-manager", [
            b("kube-controller-manager"), f"--kubeconfig={kubeconfig('controller-manager')}",
            f"--authentication-kubeconfig={kubeconfig('controller-manager')}",
            f"--authorization-kubeconfig={kubeconfig('controller-manager')}",
            "--bind-address=127.0.0.1", f"--secure-port={PORTS['controller-manager']}",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true", "--leader-elect=false",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--cluster-name=faster-qat-dev",
            "--concurrent-job-syncs=10", f"--cert-dir={state / 'controller-manager'}"],
            _ok(f"https://127.0.0.1:{PORTS['controller-manager']}/healthz", insecure)),
        Component("kube-scheduler", [
            b("kube-scheduler"), f"--kubeconfig={kubeconfig('scheduler')}",
            f"--authentication-kubeconfig={kubeconfig('scheduler')}",
            f"--authorization-kubeconfig={kubeconfig('scheduler')}",
            "--bind-address=127.0.0.1", f"--secure-port={PORTS['scheduler']}", "--leader-elect=false",
            f"--cert-dir={state / 'scheduler'}"],
            _ok(f"https://127.0.0.1:{PORTS['scheduler']}/healthz", insecure)),
        Component("containerd", ["containerd", f"--config={conf / 'containerd.toml'}"],
                  lambda: _containerd_ok(layout), before_start=ensure_bridge,
                  after_start=lambda: _import_pause(layout), before_stop=lambda: _remove_pods(layout),
                  after_stop=lambda: _after_containerd(layout), stop_grace_s=20),
        Component("kubelet", [
            b("kubelet"), f"--config={conf / 'kubelet.yaml'}", f"--kubeconfig={kubeconfig('kubelet')}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", f"--root-dir={state / 'kubelet'}",
            f"--cert-dir={state / 'kubelet' / 'pki'}", "--v=1"],
            _ok(f"http://127.0.0.1:{PORTS['kubelet-healthz']}/healthz"), start_timeout_s=90,
            before_start=lambda: _resolv_conf(layout), after_start=lambda: _wait_node_ready(layout),
            after_stop=_kubelet_iptables_cleanup),
        Component("kube-proxy", [b("kube-proxy"), f"--config={conf / 'kube-proxy.yaml'}"],
                  _ok(f"http://127.0.0.1:{PORTS['kube-proxy-healthz']}/healthz"),
                  after_stop=lambda: _proxy_cleanup(layout)),
        Component("coredns", [b("coredns"), f"-conf={conf / 'Corefile'}"],
                  _ok(f"http://127.0.0.1:{PORTS['coredns-ready']}/ready")),
    ]


def _bootstrap(layout: Layout) -> None:
    kubectl(layout, "apply", "--server-side", "--field-manager=faster-qat-dev-cluster",
            "-f", str(layout.state / "conf" / "bootstrap.yaml"))


def _ctr(layout: Layout, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _sh("ctr", f"--address={layout.containerd_socket}", "--namespace=k8s.io", *args, check=check)


def _containerd_ok(layout: Layout) -> bool:
    return layout.containerd_socket.exists() and _ctr(layout, "version", check=False).returncode == 0


def _import_pause(layout: Layout) -> None:
    if PAUSE_IMAGE in _ctr(layout, "images", "ls", "-q").stdout.split():
        return
    from oci_archive import write_image_archive

    archive = layout.state / "pause.tar"
    write_image_archive(archive, PAUSE_IMAGE, layout.bin_dir / "pause", "/pause", ["/pause"])
    _ctr(layout, "images", "import", "--no-unpack=false", str(archive))


def _resolv_conf(layout: Layout) -> None:
    # Pods on the default DNS policy get the node's resolv.conf: keep them to the cluster's DNS.
    write_if_changed(layout.state / "conf" / "resolv.conf", f"nameserver {NODE_IP}\n")


def _wait_node_ready(layout: Layout, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        out = kubectl(layout, "get", "node", NODE_NAME, "-o",
                      'jsonpath={.status.conditions[?(@.type=="Ready")].status}', check=False)
        if out.strip() == "True":
            return
        time.sleep(1)
    raise SystemExit(f"cluster: node {NODE_NAME} not Ready after {timeout_s:.0f} s; see {layout.log_file('kubelet')}")


def _remove_pods(layout: Layout) -> None:
    """Kill every container and sandbox of the node, so no shim outlives the cluster; note the
    sandboxes' network namespaces (CNI never gets to tear them down) for _after_containerd."""
    namespaces = set()
    for container in _ctr(layout, "containers", "ls", "-q", check=False).stdout.split():
        info = _ctr(layout, "containers", "info", container, check=False)
        try:
            spec = json.loads(info.stdout)["Spec"]["linux"]["namespaces"]
        except (ValueError, KeyError, TypeError):
            continue
        namespaces |= {ns.get("path", "") for ns in spec if ns.get("type") == "network"}
    write_if_changed(layout.run / "netns.json", json.dumps(sorted(p for p in namespaces if "/netns/" in p)))
    for task in _ctr(layout, "tasks", "ls", "-q", check=False).stdout.split():
        _ctr(layout, "tasks", "kill", "--signal=SIGKILL", task, check=False)
    deadline = time.time() + 20
    while time.time() < deadline:
        tasks = _ctr(layout, "tasks", "ls", "-q", check=False).stdout.split()
        for task in tasks:
            _ctr(layout, "tasks", "delete", "--force", task, check=False)
        if not _ctr(layout, "tasks", "ls", "-q", check=False).stdout.split():
            break
        time.sleep(0.5)
    for container in _ctr(layout, "containers", "ls", "-q", check=False).stdout.split():
        _ctr(layout, "containers", "delete", container, check=False)


def _after_containerd(layout: Layout) -> None:
    """Shims are their own sessions: end the ones of this containerd, by pid; then the pods'
    network namespaces (CNI never got to tear them down) and the bridge."""
    address = str(layout.containerd_socket)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and address.encode() in argv:
            try:
                os.kill(int(proc.name), 9)
            except ProcessLookupError:
                pass
    listed = layout.run / "netns.json"
    for path in json.loads(listed.read_text()) if listed.is_file() else []:
        _sh("ip", "netns", "delete", Path(path).name, check=False)
    listed.unlink(missing_ok=True)
    shutil.rmtree(layout.state / "cni" / "ipam", ignore_errors=True)
    for mount in _our_mounts(layout):
        _sh("umount", "-l", mount, check=False)
    remove_bridge()


def _our_mounts(layout: Layout) -> list[str]:
    """Mounts under the state directory (rootfs overlays, volumes, shm), deepest first."""
    prefix = str(layout.state) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix) or point.startswith(str(layout.run) + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: -p.count("/"))


KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")


def _kubelet_iptables_cleanup() -> None:
    """The kubelet's own chains (a localnet guard in filter, canaries, a hint) outlive it."""
    for command in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            rules = _sh(command, "-t", table, "-S", check=False).stdout.splitlines()
            for rule in rules:
                parts = shlex.split(rule)
                if parts[:1] == ["-A"] and "-j" in parts and parts[parts.index("-j") + 1] in KUBELET_CHAINS \
                        and parts[1] not in KUBELET_CHAINS:
                    _sh(command, "-t", table, "-D", *parts[1:], check=False)
            for chain in KUBELET_CHAINS:
                if f"-N {chain}" in rules:
                    _sh(command, "-t", table, "-F", chain, check=False)
                    _sh(command, "-t", table, "-X", chain, check=False)


def _proxy_cleanup(layout: Layout) -> None:
    """kube-proxy's iptables chains stay after it exits; --cleanup removes them."""
    _sh(str(layout.bin_dir / "kube-proxy"), "--cleanup", f"--config={layout.state / 'conf' / 'kube-proxy.yaml'}",
        check=False)

