"""New connections are accepted promptly by a busy server, on uvloop as on asyncio."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
from collections.abc import Callable

import pytest
import uvloop

from mirror.acceptor import OUT_OF_DESCRIPTORS_PAUSE, Acceptor
from mirror.server import bind

WAITING = 50


class Counted(asyncio.Protocol):
    made: list[asyncio.BaseTransport]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self.made.append(transport)


async def _accepted_in_a_few_turns(sock: socket.socket) -> int:
    """Queue ``WAITING`` connections in the kernel while the loop is not running, then
    let it turn a few times, as a loop busy with other clients would between reads."""
    made: list[asyncio.BaseTransport] = []
    protocol = type("P", (Counted,), {"made": made})
    acceptor = Acceptor(sock, protocol)
    clients = [socket.create_connection(sock.getsockname()[:2]) for _ in range(WAITING)]
    try:
        for _ in range(8):
            await asyncio.sleep(0)
        return len(made)
    finally:
        await _close_all(acceptor, made, clients)


async def _close_all(acceptor: Acceptor, made: list[asyncio.BaseTransport], clients: list[socket.socket]) -> None:
    acceptor.close()
    await acceptor.wait_closed()
    for transport in made:
        transport.close()
    for client in clients:
        client.close()


@pytest.mark.parametrize("loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"])
def test_every_waiting_connection_is_accepted_within_a_few_turns_of_the_loop(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    """uvloop's own servers take one connection per turn: 7 of 50 here, and under load new
    clients waited seconds. The acceptor takes them all at once."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert runner.run(_accepted_in_a_few_turns(bind(("127.0.0.1", 0)))) == WAITING


def test_a_closed_acceptor_refuses_new_connections() -> None:
    async def scenario() -> None:
        sock = bind(("127.0.0.1", 0))
        address = sock.getsockname()[:2]
        acceptor = Acceptor(sock, asyncio.Protocol)
        acceptor.close()
        await acceptor.wait_closed()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())



def test_out_of_descriptors_pauses_accepting_with_a_warning_then_takes_the_waiting_clients(caplog) -> None:  # type: ignore[no-untyped-def]
    """EMFILE leaves the listening socket readable: without a pause the loop would spin on it."""
    async def scenario() -> None:
        made: list[asyncio.BaseTransport] = []
        sock = bind(("127.0.0.1", 0))
        acceptor = Acceptor(sock, type("P", (Counted,), {"made": made}))
        clients = [socket.create_connection(sock.getsockname()[:2]) for _ in range(5)]
        lowest_free = os.dup(0)
        os.close(lowest_free)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no new descriptor can be made
        try:
            await asyncio.sleep(0.3)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            assert made == []
            warnings = [r for r in caplog.records if "accept failed" in r.getMessage()]
            assert len(warnings) == 1, [r.getMessage() for r in warnings]  # paused, not spinning
            await asyncio.sleep(OUT_OF_DESCRIPTORS_PAUSE + 0.5)
            assert len(made) == len(clients)
        finally:
            await _close_all(acceptor, made, clients)

    with caplog.at_level(logging.WARNING, logger="mirror"), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
