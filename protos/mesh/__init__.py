"""Mesh control-plane wire contracts (generated modules are built by `make protos`)."""
