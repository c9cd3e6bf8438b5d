"""The control protocol: QMP framing, server, client and the TLS relay."""
