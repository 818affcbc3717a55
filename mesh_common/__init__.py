"""Pure logic shared by the sidecar and the control plane: no I/O anywhere in this package."""
