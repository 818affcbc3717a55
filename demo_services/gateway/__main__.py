"""``python -m demo_services.gateway serve [--config FILE] [--listen HOST:PORT]
[--outbound HOST:PORT] [--tls-cert PEM --tls-key PEM] [--reload-interval-s S]``

``python -m demo_services.gateway token SUBJECT [--ttl S]``: a demo bearer token (signed with
the demo's key under ``$MESH_DEMO_DIR/gateway``).

``serve`` listens on ``$MESH_DEMO_GATEWAY`` (default 127.0.0.1:8080) unless ``--listen`` says
otherwise, reaches the services through the sidecar's outbound port and prints
``{"ready": {...}}`` once it serves; SIGTERM/SIGINT stop it (exit 0). Exit 2 for a config
refused at start or a usage error, 1 if it cannot listen.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "gateway.yaml"


def parse_serve(argv: list[str]) -> argparse.Namespace:
    from mesh_common.cli_args import OneLineArgumentParser
    from mesh_common.numbers import finite_arg

    from .server import DEFAULT_LISTEN, LISTEN_ENV

    p = OneLineArgumentParser(prog="python -m demo_services.gateway serve",
                              description="Run the API gateway.")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"the YAML config, polled for changes (default {DEFAULT_CONFIG})")
    p.add_argument("--listen", default=os.environ.get(LISTEN_ENV, "").strip() or DEFAULT_LISTEN,
                   help=f"HOST:PORT to serve on (default ${LISTEN_ENV} or {DEFAULT_LISTEN}; "
                        f"port 0: a free one)")
    p.add_argument("--outbound", default="127.0.0.1:15001",
                   help="the gateway's sidecar's outbound listener (HOST:PORT)")
    p.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS: certificate PEM")
    p.add_argument("--tls-key", type=Path, default=None, help="serve HTTPS: private key PEM")
    p.add_argument("--reload-interval-s", type=finite_arg, default=1.0,
                   help="how often the config file is looked at (seconds)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    from demo_services.common.server import split_hostport
    try:
        split_hostport(args.listen)
        split_hostport(args.outbound)
    except ValueError as exc:
        p.error(str(exc))
    if not 0.05 <= args.reload_interval_s <= 3600:
        p.error("--reload-interval-s: 0.05 to 3600")
    return args


def serve_main(argv: list[str]) -> int:
    import uvloop

    from demo_services.common.server import basic_logging

    from .server import serve, ssl_context

    args = parse_serve(argv)
    basic_logging(args.log_level)
    try:
        tls = ssl_context(args.tls_cert, args.tls_key)
    except (OSError, ValueError) as exc:
        print(f"gateway: TLS: {exc}", file=sys.stderr)
        return 2
    return uvloop.run(serve(args.config, args.listen, args.outbound, tls=tls,
                            reload_interval_s=args.reload_interval_s))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if not args:
        print("gateway: a command is needed (serve, token; --help for more)", file=sys.stderr)
        return 2
    command, rest = args[0], args[1:]
    if command == "serve":
        return serve_main(rest)
    if command == "token":
        from .auth import token_main
        return token_main(rest)
    print(f"gateway: unknown command {command!r} (serve, token)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
