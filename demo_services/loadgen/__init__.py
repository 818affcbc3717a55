"""The load generator: creates orders through the mesh from its own identity (service
``loadgen``, an outbound-only sidecar), open loop at a bounded rate, with a mix that
exercises every path of the saga. ``python -m demo_services.loadgen --help``."""
