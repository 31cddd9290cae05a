#!/usr/bin/env python3
"""A real one-node Kubernetes cluster on this machine, for the tests and for trying the k8s backend.

    k8s/dev-cluster/cluster.py start    # builds the binaries if needed, starts what is not running
    k8s/dev-cluster/cluster.py status   # one line per component; exit 1 unless all are healthy
    k8s/dev-cluster/cluster.py env      # KUBECONFIG=..., FASTER_QAT_REGISTRY=..., PATH for `eval`
    k8s/dev-cluster/cluster.py stop     # stops every process it started, pods and their sandboxes too

`start` prints one JSON object (kubeconfig, server, registry, node, node_ip, state) and reuses
every component that is already running and healthy, so calling it twice is cheap.

What runs (all from the binaries build.sh makes, plus Debian's containerd, runc, CNI plugins and
docker-registry): etcd, kube-apiserver (RBAC + Node authorization, service-account tokens),
kube-controller-manager (Job controller, PV binder, ...), kube-scheduler, containerd with a CNI
bridge, a kubelet, kube-proxy (iptables) and CoreDNS as host processes, and a registry.

Addresses: the servers listen on 127.0.0.1. The node's address is 10.244.0.1 on the bridge the
pods hang off (`fq-cni0`, made here; no route leaves the machine): the kubelet serves there (the
kubelet refuses a loopback node IP) and CoreDNS answers there (the pods' nameserver).
State lives in $FASTER_QAT_K8S_STATE (default /var/lib/faster-qat/k8s-dev), binaries in
$FASTER_QAT_CACHE (default /var/cache/faster-qat). Root only (kubelet, containerd, netns).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from components import Component, components  # noqa: E402
from configs import write_configs  # noqa: E402
from layout import PORTS, Layout  # noqa: E402

HERE = Path(__file__).resolve().parent


def build(layout: Layout) -> Path:
    done = subprocess.run([str(HERE / "build.sh")], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "K8S_RELEASE": layout.release})
    if done.returncode != 0:
        raise SystemExit(f"cluster: build.sh failed (exit {done.returncode})")
    return Path(done.stdout.strip().splitlines()[-1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def running_pid(layout: Layout, component: Component) -> int | None:
    """The component's pid from its pid file, if that process is alive and still runs the
    component's program (a stale pid file may name a reused pid of someone else's process)."""
    try:
        pid = int(layout.pid_file(component.name).read_text())
        program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return pid if _alive(pid) and program == component.argv[0] else None


def launch(layout: Layout, component: Component) -> int:
    log = layout.log_file(component.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n=== {time.strftime('%F %T')} {' '.join(component.argv)}\n".encode())
        process = subprocess.Popen(component.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=layout.state, env=component.env)
    layout.pid_file(component.name).write_text(f"{process.pid}\n")
    return process.pid


def wait_healthy(layout: Layout, component: Component, pid: int, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not _alive(pid):
            tail = layout.log_file(component.name).read_text(errors="replace").strip().splitlines()[-15:]
            raise SystemExit(f"cluster: {component.name} exited; last lines of {layout.log_file(component.name)}:\n"
                             + "\n".join(tail))
        if component.healthy():
            return
        time.sleep(0.3)
    raise SystemExit(f"cluster: {component.name} not healthy after {timeout_s:.0f} s; "
                     f"see {layout.log_file(component.name)}")


RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


def reserve_ports() -> None:
    """Keep the kernel from giving the cluster's ports to outgoing connections: they lie in the
    ephemeral range (32768-60999), and on a busy machine (two test workers) a client socket once
    held the kubelet's healthz port when the kubelet started. Merged with what is reserved."""
    try:
        current = [part for part in RESERVED_PORTS.read_text().strip().split(",") if part]
        # the kernel merges overlaps and writes ranges back ("32379-32380"): no need to compare
        RESERVED_PORTS.write_text(",".join(current + [str(port) for port in sorted(PORTS.values())]))
    except OSError as error:  # a read-only /proc/sys (some containers): the ports stay unreserved
        print(f"cluster: warning: could not reserve the cluster's ports in {RESERVED_PORTS} ({error}); "
              "a process may take one of them first", file=sys.stderr)


def start(layout: Layout) -> dict[str, str]:
    if os.geteuid() != 0:
        raise SystemExit("cluster: must run as root (kubelet, containerd and pod networking need it)")
    reserve_ports()
    started = time.time()
    binaries = build(layout)
    built = time.time()
    write_configs(layout, binaries)
    for component in components(layout, binaries):
        pid = running_pid(layout, component)
        if pid is not None and component.healthy():
            continue
        if pid is not None:  # running but sick: replace it
            _stop_pid(pid, 15)
        if component.before_start:
            component.before_start()
        pid = launch(layout, component)
        wait_healthy(layout, component, pid, component.start_timeout_s)
        if component.after_start:
            component.after_start()
    info = layout.info()
    info["build_s"] = f"{built - started:.1f}"
    info["start_s"] = f"{time.time() - built:.1f}"
    return info


def _stop_pid(pid: int, grace_s: float) -> None:
    """SIGTERM the process group the component leads, SIGKILL what is left after grace_s."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline and _alive(pid):
            time.sleep(0.2)
        if not _alive(pid):
            return


def stop(layout: Layout) -> list[str]:
    binaries = layout.bin_dir
    stopped = []
    ordered = list(reversed(components(layout, binaries)))
    for component in ordered:
        if component.before_stop and running_pid(layout, component) is not None:
            component.before_stop()
        pid = running_pid(layout, component)
        if pid is not None:
            _stop_pid(pid, component.stop_grace_s)
            stopped.append(component.name)
        layout.pid_file(component.name).unlink(missing_ok=True)
        if component.after_stop:
            component.after_stop()
    return stopped


def status(layout: Layout) -> bool:
    ok = True
    for component in components(layout, layout.bin_dir):
        pid = running_pid(layout, component)
        healthy = pid is not None and component.healthy()
        ok &= healthy
        print(f"{component.name:24} {'healthy' if healthy else 'running, unhealthy' if pid else 'stopped'}"
              + (f" (pid {pid})" if pid else ""))
    return ok


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("start", "stop", "status", "env", "info"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    layout = Layout.from_env()
    if argv[0] == "start":
        print(json.dumps(start(layout)))
    elif argv[0] == "stop":
        print(f"stopped: {', '.join(stop(layout)) or 'nothing was running'}")
    elif argv[0] == "status":
        return 0 if status(layout) else 1
    elif argv[0] == "info":
        print(json.dumps(layout.info()))
    else:
        info = layout.info()
        print(f"export KUBECONFIG={info['kubeconfig']} FASTER_QAT_REGISTRY={info['registry']} "
              f"PATH={info['bin']}:$PATH")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
