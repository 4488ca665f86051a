"""The link between the daemons of a cluster: how a ``connect`` to a name on another host is
arranged. A daemon started with ``--listen ADDR:PORT`` (and ``--cluster``) takes TCP connections
there from the other daemons and advertises the address in its host znode (``cluster.py``).

One request per TCP connection, framed like every control channel (``fable._wire``: a u32
length, a JSON object, version ``LINK_VERSION``), one reply, then the connection closes:

    connecting host's daemon                          listener's host's daemon (LinkServer)
    remote-connect {host, name, to, transport,  ──►   the caller's address must be one the
      safe, reason, flow, token (T2), timeout}          cluster lists for ``host``; ``to``
                                                        listens here (waited for, as a local
                                                        connect waits) and allows ``host``;
                                                        the transport crosses hosts; a
                                                        listening TCP socket and T1 go to the
                                                        listener's process with T2 ("incoming")
                                                ◄──   {ok, address, port, token (T1)} or
                                                      {ok: false, error, message}

Nothing on the link is trusted further than that: a request arrives from an address of the
host it names (the cluster tier's list of that host's addresses) or is refused; its fields are
checked; a caller has FABLE_FRAME_TIMEOUT to send its request; at most ``MAX_LINKS`` are served at
once. The tokens then prove each process to the other (``fable/transports/across.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fable._wire import Codec
from fable.config import settings
from fable.errors import DaemonUnavailable, FableError, ProtocolError, Timeout
from fable.nameservice import error_class
from fable.transports.across import tune

__all__ = ["LINK", "MAX_LINKS", "LinkServer", "ask"]

log = logging.getLogger("fable.daemon")

LINK_VERSION = 1
LINK = Codec("link", LINK_VERSION, max_frame=16 * 1024)
MAX_LINKS = 64  # requests served at once; more callers are closed at once

Handler = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]


async def _frame(reader: asyncio.StreamReader, timeout: float | None) -> dict[str, Any]:
    """One frame within ``timeout`` s: TimeoutError, IncompleteReadError, ProtocolError."""

    async def read() -> dict[str, Any]:
        head = await reader.readexactly(4)
        return LINK.decode(await reader.readexactly(LINK.length(head)))

    return await asyncio.wait_for(read(), timeout)


async def ask(
    address: str, port: int, req: dict[str, Any], timeout: float, wait: float | None
) -> dict[str, Any]:
    """Send ``req`` to the daemon at ``address:port`` and return its reply's fields; the
    error the reply names is raised. ``Timeout`` if it does not take the connection within
    ``timeout`` s or does not answer within ``wait`` s more (None: as long as it lives: the
    socket's keepalive finds a dead host), ``DaemonUnavailable`` if it refuses or hangs up."""
    where = f"{address}:{port}"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except TimeoutError:
        raise Timeout(f"the daemon at {where} did not answer in {timeout:g} s") from None
    except OSError as e:
        raise DaemonUnavailable(f"the daemon at {where}: {e.strerror or e}") from None
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            tune(sock)
        writer.write(LINK.encode(req))
        reply = await _frame(reader, wait)
    except TimeoutError:
        raise Timeout(f"the daemon at {where} did not answer in time") from None
    except (OSError, asyncio.IncompleteReadError) as e:
        raise DaemonUnavailable(f"the daemon at {where} hung up: {e}") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    if reply.get("ok") is not True:
        raise error_class(reply.get("error"))(
            f"host daemon at {where}: {str(reply.get('message', 'refused'))[:500]}"
        )
    return reply


class LinkServer:
    """The daemon's TCP listener for the other daemons; ``handle(caller's address, our
    address it reached, request)`` answers a request (its FableError is the reply's error)."""

    def __init__(self, address: str, port: int, handle: Handler) -> None:
        self.address = address
        self.port = port
        self.handle = handle
        self.active = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen (FableError if the address cannot be bound); ``port`` is the real one."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.address, self.port, reuse_address=True
            )
        except OSError as e:
            raise FableError(f"--listen {self.address}:{self.port}: {e.strerror or e}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("taking connections from other hosts on %s:%d", self.address, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        here = writer.get_extra_info("sockname")
        if self.active >= MAX_LINKS or not peer or not here:
            writer.close()
            return
        self.active += 1
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    tune(sock)
            try:
                req = await _frame(reader, settings().frame_timeout_s)
            except (TimeoutError, asyncio.IncompleteReadError, OSError):
                return  # silence, a cut frame: nothing to answer
            except ProtocolError as e:
                reply: dict[str, Any] = {"ok": False, "error": "ProtocolError", "message": str(e)}
            else:
                try:
                    reply = {"ok": True, **await self.handle(str(peer[0]), str(here[0]), req)}
                except FableError as e:
                    reply = {"ok": False, "error": type(e).__name__, "message": str(e)[:500]}
                    log.warning("refused %s from %s: %s", req.get("op"), peer[0], e)
                except Exception as e:  # the daemon's own trouble: said, logged, not fatal
                    log.exception("link request %s from %s failed", req.get("op"), peer[0])
                    reply = {"ok": False, "error": "DaemonUnavailable", "message": str(e)[:500]}
            with contextlib.suppress(OSError, ValueError):
                writer.write(LINK.encode(reply))
                await asyncio.wait_for(writer.drain(), 5.0)
        except (OSError, TimeoutError):
            pass
        finally:
            self.active -= 1
            writer.close()
