"""The mesh's API gateway: HTTP/JSON at the edge, gRPC to the services through its own
outbound-only sidecar (service ``gateway``); bearer JWTs, rate limits, composition.

``python -m demo_services.gateway serve --config FILE --outbound HOST:PORT`` runs it;
``python -m demo_services.gateway token SUBJECT`` mints a demo token.
"""
