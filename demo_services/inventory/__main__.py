"""``python -m demo_services.inventory serve --instance ID --db PATH [--listen HOST:PORT]
[--control-listen HOST:PORT] [--log-level info]``: run one inventory replica
(see ``demo_services.common.cli``)."""

from __future__ import annotations

from demo_services.common.cli import participant_cli, run

from .service import spec

PROG = "python -m demo_services.inventory"

cli = participant_cli("inventory", "The demo's inventory service: stock per SKU and reservations per order.", "inventory.Inventory", spec)


def main(argv: list[str] | None = None) -> None:
    run(cli, PROG, argv)


if __name__ == "__main__":
    main()
