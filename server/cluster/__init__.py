"""`vlserve cluster`: N `vlserve serve` replicas on loopback behind vllm-router.

The router is an existing program (the `vllm-router` wheel, `pip install 'vlserve[cluster]'`);
this package only starts it and the replicas, waits for them, replaces a replica that dies
and drains everything on SIGTERM. See README "Scaling out".
"""

from server.cluster.cluster import Cluster, ClusterSpec

__all__ = ["Cluster", "ClusterSpec"]
