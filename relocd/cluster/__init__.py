"""The optional cluster store (etcd): domain ownership and the fleet's registry (docs/cluster.md)."""
