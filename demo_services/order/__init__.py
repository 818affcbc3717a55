"""The order service: the saga orchestrator (reserve stock -> charge payment -> confirm, or
compensate and cancel), event-sourced with a CQRS read model and a durable, leased saga log.

Modules: ``events`` (event log, projector, read model, rebuild check), ``saga`` (the pure
state machine), ``store`` (order's database: orders + sagas + leases), ``participants``
(inventory/payment interface and its gRPC implementation), ``runner`` (drives sagas, recovery),
``service`` (``order.Order``), ``__main__`` (``serve``, ``rebuild``).
"""
