"""The shared-memory ring: ``layout`` (the format, drawn and defined once; ``_core/ring.h``
mirrors it) and ``pyring`` (the pure-Python reference implementation of its protocol, which the
C fast path ``fable._core.Ring`` must match). The mempipe transports run on the C ring."""
