"""The shared-memory ring: ``layout`` (the format, drawn and defined once) and ``pyring`` (the
pure-Python reference implementation of its protocol). The C fast path and the mempipe
transports built on it are not part of this release yet."""
