"""The few Kubernetes API calls the k8s backend makes, over the kubernetes client's transport
(kubeconfig or in-cluster auth): server-side apply, list by label, delete, pod logs."""

from __future__ import annotations

import json
import os
import re
from typing import Any
from urllib.parse import quote, urlencode

from pipeline.errors import BackendError

FIELD_MANAGER = "faster-qat"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
REQUEST_TIMEOUT_S = 60
_PLURALS = {"Namespace": "namespaces", "ConfigMap": "configmaps", "Service": "services",
            "PersistentVolumeClaim": "persistentvolumeclaims", "Job": "jobs", "Pod": "pods"}


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{_PLURALS[kind]}" if namespace and kind != "Namespace" \
        else f"{base}/{_PLURALS[kind]}"
    return f"{path}/{name}" if name else path


def _transport_failure(error: Exception) -> str:
    """The cause of a request that reached no API server, in words: urllib3's MaxRetryError wraps
    it in reprs ("Max retries exceeded ... (Caused by NewConnectionError('<...HTTPSConnection
    object at 0x7f..>: Failed to establish a new connection: [Errno 111] Connection refused'))")
    that a cut to length loses the cause in; its `reason` is the cause itself."""
    cause = getattr(error, "reason", None)
    cause = cause if isinstance(cause, BaseException) else error
    text = re.sub(r"<[^<>]* object at 0x[0-9a-f]+>:? ?", "", str(cause)).strip()
    text = text.splitlines()[0] if text else ""
    return f"{type(cause).__name__}: {text[:300]}".rstrip(": ")


class KubeApi:
    """Raw JSON requests; every failure becomes a one-line BackendError."""

    def __init__(self, api_client: Any = None) -> None:
        self._client = api_client

    @property
    def client(self) -> Any:
        if self._client is None:
            from kubernetes import client, config

            try:  # KUBECONFIG read now: the client reads it once, at import
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
            except Exception as kube_error:
                try:
                    config.load_incluster_config()
                except Exception:
                    raise BackendError(f"k8s: no cluster credentials: {str(kube_error).splitlines()[0]} "
                                       "(set KUBECONFIG or run `kubectl config use-context`)") from None
            self._client = client.ApiClient()
        return self._client

    def request(self, method: str, path: str, query: list[tuple[str, str]] | None = None,
                body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        # The REST client's plain request: the one call the kubernetes client's releases before
        # and after its v37 generator change share (nemo-run's torchx pins urllib3 < 2, hence
        # kubernetes < 37, in the same environment).
        configuration = self.client.configuration
        # kube_config keeps a token as api_key["BearerToken"]; get_api_key_with_prefix refreshes
        # an expiring one (exec plugins, in-cluster service account tokens) first.
        token = configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        if token:
            headers["authorization"] = token
        url = configuration.host + path + (f"?{urlencode(query)}" if query else "")
        try:
            response = self.client.rest_client.request(
                method, url, headers=headers, body=body,
                _request_timeout=REQUEST_TIMEOUT_S)
            status = response.status
            text = response.data if getattr(response, "data", None) is not None else response.read()
        except ApiException as error:  # releases before v37 raise on >= 400; later ones return
            status, text = error.status, error.body or ""
        except Exception as error:  # connection refused, TLS, DNS
            raise BackendError(f"k8s: {method} {path}: {_transport_failure(error)}") from None
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        if status >= 400:
            raise ApiError(status, method, path, text)
        try:
            return json.loads(text) if text else {}
        except json.JSONDecodeError:
            return {"text": text}

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return self.request("PATCH", path, [("fieldManager", FIELD_MANAGER), ("force", "true")],
                            obj, APPLY_CONTENT_TYPE)

    def list(self, api_version: str, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        found = self.request("GET", object_path(api_version, kind, namespace), [("labelSelector", selector)])
        return found.get("items", [])

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", object_path(api_version, kind, namespace, name))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        try:
            self.request("DELETE", object_path(api_version, kind, namespace, name),
                         body={"kind": "DeleteOptions", "apiVersion": "v1",
                               "propagationPolicy": "Background"})
        except ApiError as error:
            if error.status != 404:
                raise

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        path = f"/api/v1/namespaces/{namespace}/pods/{quote(pod)}/log"
        found = self.request("GET", path, [("container", container)])
        return found.get("text", "") if "text" in found else json.dumps(found)


class ApiError(BackendError):
    def __init__(self, status: int, method: str, path: str, text: str) -> None:
        self.status = status
        try:
            message = json.loads(text).get("message", text)
        except (json.JSONDecodeError, AttributeError):
            message = text
        super().__init__(f"k8s: {method} {path}: {status}: {str(message).splitlines()[0][:300]}"
                         if message else f"k8s: {method} {path}: {status}")
