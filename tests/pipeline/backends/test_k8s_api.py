"""`submit --cluster k8s` with a kubeconfig that leads nowhere, offline: one line that names the
cause, exit 1, nothing written. (The same refusals against the real API server, and a token the
server refuses: test_k8s_cluster.py.)"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.smoke import REPO, pipeline_cli


@pytest.fixture
def refused_port():
    """A port bound but not listening for the test's length: a connection to it is refused at
    once, and no other process can take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def kubeconfig_for(server: str, path: Path) -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: dev, cluster: {{server: "{server}", insecure-skip-tls-verify: true}}}}]
users: [{{name: someone, user: {{token: a-token}}}}]
contexts: [{{name: dev, context: {{cluster: dev, user: someone}}}}]
current-context: dev
""")
    return path


def submit(root: Path) -> tuple[int, str]:
    done = pipeline_cli("submit", "--cluster", "k8s", "-c", "smoke", "--root", str(root),
                        "--set", f"k8s.host_mounts=[{REPO / 'fixtures'}]", timeout=120)
    return done.returncode, done.stderr


def test_an_api_server_that_refuses_the_connection_is_named_in_one_line(tmp_path, refused_port, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig_for(f"https://127.0.0.1:{refused_port}", tmp_path / "k")))
    code, error = submit(tmp_path / "runs")
    assert code == 1
    # The cause itself, not urllib3's wrapper cut short before it (nor an object's address).
    assert error == ("error: k8s: GET /api/v1/namespaces/faster-qat: NewConnectionError: "
                     "Failed to establish a new connection: [Errno 111] Connection refused\n")
    assert not (tmp_path / "runs").exists()


def test_a_missing_kubeconfig_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such.kubeconfig"))
    code, error = submit(tmp_path / "runs")
    assert code == 1
    assert error.count("\n") == 1 and error.startswith("error: k8s: no cluster credentials: "), error
    assert not (tmp_path / "runs").exists()
