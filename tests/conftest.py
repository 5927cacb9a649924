"""Shared fixtures. One Ray cluster per test session, started on first use: two Ray nodes on
this machine (``ray.cluster_utils.Cluster``), small object stores, no dashboard."""

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=1, object_store_memory=100 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
