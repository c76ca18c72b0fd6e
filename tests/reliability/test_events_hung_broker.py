"""Flower events never block a worker, even when the broker hangs.

A real Celery ``EventDispatcher`` on a real redis-server, behind the consumer's
``EventSender`` (workers/monitor_events.py). The server is stopped with SIGSTOP: its
connections stay open and a publish would wait forever (kombu sets no socket timeout).
The worker's calls must still return at once; events beyond the queue bound are dropped
and counted; stopping gives up after its timeout instead of hanging; once the server
resumes, the queued events go out and the thread ends.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from imgpipe.broker import EmbeddedRedis
from imgpipe.celery_app import create_app
from imgpipe.settings import Settings
from tests.support.services import short_tmp_dir
from workers.monitor_events import EventSender

pytestmark = pytest.mark.timeout(60)

QUEUED = 50
CALL_BUDGET_S = 2.0
"""Far above what 200 queue puts take, far below "forever": the calls must not wait for
the broker."""


@pytest.fixture
def broker() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(short_tmp_dir("ipev-") / "redis")
    server.start()
    yield server
    if server.process is not None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


def test_events_do_not_block_on_a_stopped_broker(broker: EmbeddedRedis) -> None:
    assert broker.process is not None
    app = create_app(Settings(broker_url=broker.celery_url, data_dir=short_tmp_dir("ipevd-")))
    with app.connection_for_write() as conn:
        dispatcher = app.events.Dispatcher(conn, hostname="drill@test", buffer_group=["task"])
        sender = EventSender(dispatcher, max_queued=QUEUED)
        sender.send("worker-online")
        assert sender.close(10), "with the broker up, the events go out and the thread ends"

        sender = EventSender(dispatcher, max_queued=QUEUED)
        os.kill(broker.process.pid, signal.SIGSTOP)
        try:
            sender.send("worker-heartbeat", active=0)  # published at once: the thread hangs
            started = time.monotonic()
            for i in range(4 * QUEUED):
                sender.send("task-succeeded", uuid=f"t{i}", result="succeeded", runtime=0.1)
                if i % 8 == 7:
                    sender.flush()
            elapsed_s = time.monotonic() - started
            assert elapsed_s < CALL_BUDGET_S, f"queuing events took {elapsed_s:.1f} s"
            assert sender.dropped > 0, "events beyond the bound are dropped, not waited for"
            assert not sender.close(0.5), "a stop does not wait for a hung broker"
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while sender.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sender.running, "once the broker resumes, the queued events go out and it ends"
        dispatcher.close()
