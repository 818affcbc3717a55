"""The mesh sidecar: an HTTP/2 frame relay with mutual TLS beside every service instance."""
