"""Sans-IO HTTP/2 relay core: bytes in, events and bytes out; no sockets here."""
