"""The control protocol: QEMU's QMP wire protocol, so QEMU's own tools drive repdisk's sockets.

``qemu.qmp.QMPClient``, its legacy ``QEMUMonitorProtocol`` and ``qmp-shell`` work unchanged
against a :class:`~repdisk.qmp.server.QMPServer`, because it speaks exactly what they check: a
greeting with ``version.qemu.{major,minor,micro}`` and ``package``; ``qmp_capabilities``
answered with ``return`` before anything else is allowed; replies that echo the request's
``id`` (and carry none when the request could not be parsed, which ends the client's session,
as with QEMU); events as ``{"event", "data", "timestamp"}`` messages.

Modules, each using only those above it, so another transport reuses everything but the
socket:

    protocol    Command, ArgSpec (what a command is called, accepts, runs); JSON framing;
                QMPProtocol (one connection's state: bytes in -> reply bytes out; no I/O)
    tlsrelay    TLSRelay: a TLS connection's handshake and relay on its own thread
    server      QMPServer: the command table, event fan-out, listening sockets (Unix, TCP,
                TLS); one reader and one writer thread per connection
    client      QMPClient (qemu.qmp's async client on a private loop, blocking calls) and
                connect/execute, the one way repdisk's CLI and controller reach a socket

Threads: the server runs only in daemon threads it starts, so it works inside nbdkit's
Python plugin where the main thread belongs to nbdkit.  :meth:`QMPServer.emit` never blocks:
it queues the event for each negotiated client and drops a client whose queue is full.
"""
