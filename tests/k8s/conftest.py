"""The dev Kubernetes cluster (k8s/dev-cluster/) for the tests of this folder."""

from tests.k8s.dev_cluster import k8s_cluster, k8s_namespace  # noqa: F401  (fixtures)
