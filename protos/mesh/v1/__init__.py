"""mesh.v1: the control plane API (bootstrap, identity, admin)."""
