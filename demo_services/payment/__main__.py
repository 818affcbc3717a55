"""``python -m demo_services.payment serve --instance ID --db PATH [--listen HOST:PORT]
[--control-listen HOST:PORT] [--log-level info]``: run one payment replica
(see ``demo_services.common.cli``)."""

from __future__ import annotations

from demo_services.common.cli import participant_cli, run

from .service import spec

PROG = "python -m demo_services.payment"

cli = participant_cli("payment", "The demo's payment service: customer balances, merchant takings and a ledger.", "payment.Payment", spec)


def main(argv: list[str] | None = None) -> None:
    run(cli, PROG, argv)


if __name__ == "__main__":
    main()
