"""Everything the orchestrator functions need, built once per process from Settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from db.blobs import BlobStore, open_blob_store
from db.outbox import ImmediateAcks
from imgpipe.aftercommit import TaskSender
from imgpipe.celery_app import create_app
from imgpipe.events import EventPublisher
from imgpipe.settings import Settings

__all__ = ["OrchestratorContext"]


@dataclass
class OrchestratorContext:
    settings: Settings
    app: Celery | None = None
    _blobs: BlobStore | None = field(default=None, repr=False)
    _events: EventPublisher | None = field(default=None, repr=False)
    _broker_redis: redis.Redis | None = field(default=None, repr=False)
    _acks: ImmediateAcks | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.app is None:
            self.app = create_app(self.settings)

    @property
    def celery(self) -> Celery:
        assert self.app is not None
        return self.app

    @property
    def database_url(self) -> str:
        return self.settings.effective_database_url

    @property
    def blobs(self) -> BlobStore:
        if self._blobs is None:
            self._blobs = open_blob_store(self.settings.effective_blob_url)
        return self._blobs

    @property
    def broker_redis(self) -> redis.Redis:
        """A plain client on the broker's Redis (queue lengths for the reaper)."""
        if self._broker_redis is None:
            self._broker_redis = redis.Redis.from_url(
                self.settings.broker_redis_url, socket_timeout=5
            )
        return self._broker_redis

    @property
    def events(self) -> EventPublisher:
        if self._events is None:
            self._events = EventPublisher(
                self.settings.effective_redis_url, self.settings.events_maxlen
            )
        return self._events

    @property
    def acks(self) -> ImmediateAcks:
        """Removes the outbox rows of answers once they are published (db/outbox.py)."""
        if self._acks is None:
            self._acks = ImmediateAcks(self.database_url)
        return self._acks

    def send(self, task_name: str, args: list[Any], queue: str, **options: Any) -> None:
        self.celery.send_task(task_name, args=args, queue=queue, **options)

    def send_task(self, name: str, args: Any = (), **options: Any) -> None:
        """``imgpipe.aftercommit.TaskSender``: every message the orchestrator sends goes
        through ``send``."""
        queue = options.pop("queue")
        self.send(name, list(args), queue, **options)

    def with_producer(self, producer: Any) -> TaskSender:
        """A ``TaskSender`` that sends every message of a batch on ``producer`` (one
        connection, no pool round trip per message), still through ``send``."""
        return _ProducerSender(self, producer)


@dataclass(frozen=True)
class _ProducerSender:
    """A ``TaskSender`` that sends through ``ctx.send`` on one held Celery producer."""

    ctx: OrchestratorContext
    producer: Any

    def send_task(self, name: str, args: Any = (), **options: Any) -> None:
        queue = options.pop("queue")
        self.ctx.send(name, list(args), queue, producer=self.producer, **options)
