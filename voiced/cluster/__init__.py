"""Cluster mode: the daemon as the front door of synthesis replicas on a Ray cluster.

    front.py     ClusterEngine: the daemon's engine whose synthesis runs on the replicas
    replica.py   the Ray Serve deployment each replica runs (imports Ray: load it only on a cluster)

Needs the ``cluster`` extra (Ray Serve); the single-machine daemon never imports Ray.
"""

from voiced.cluster.front import ClusterEngine, ClusterError

__all__ = ["ClusterEngine", "ClusterError"]
