"""netlab: a Kubernetes datapath lab built from real network namespaces."""

__version__ = "0.1.0"
