"""The control plane: the mesh's certificate authority and source of configuration."""
