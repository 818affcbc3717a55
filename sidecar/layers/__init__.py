"""One module per concern of the request path. A layer knows only the call it wraps and its
own immutable config; ``sidecar.stack`` is the one place that orders them."""
