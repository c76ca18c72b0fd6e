"""``imgpipe probe ROLE``: is *this host's* process of ROLE alive and answering? For
container health checks (compose/docker-compose.yml): one container, one process, so
the check asks about the processes on its own host name only, never the whole stack (a
stack-wide check would mark every container unhealthy when one part is down).

- ``orchestrator``, ``cpu``, ``gpu``: a Celery remote-control ``ping`` over the broker;
  healthy when a node named ``ROLE-...@<this host>`` answers (the batching consumers of
  the stage workers answer ping like Celery workers). ``--device cuda:N`` narrows ``gpu``
  to that device's worker.
- ``ingest``: the submit stream's consumer group has a consumer named ``<this host>-...``
  that polled within ``--max-idle-s`` (a live consumer polls every
  ``IMGPIPE_INGEST_BLOCK_MS``; Redis keeps a dead one's entry, but its idle time grows).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from imgpipe.settings import Settings

__all__ = ["PROBE_ROLES", "ProbeResult", "probe"]

PROBE_ROLES = ("orchestrator", "cpu", "gpu", "ingest")


@dataclass(frozen=True)
class ProbeResult:
    healthy: bool
    detail: str


def _node_prefix(role: str, device: str | None) -> str:
    if role == "gpu" and device:
        return f"gpu-{device.replace(':', '')}-"
    return f"{role}-"


def probe_worker(
    settings: Settings, role: str, device: str | None, host: str, timeout_s: float
) -> ProbeResult:
    from imgpipe.celery_app import create_app

    app = create_app(settings)
    prefix = _node_prefix(role, device)
    try:
        replies = app.control.ping(timeout=timeout_s)
    finally:
        app.close()
    nodes = sorted(name for reply in replies for name in reply)
    mine = [n for n in nodes if n.startswith(prefix) and n.endswith(f"@{host}")]
    if mine:
        return ProbeResult(True, f"{', '.join(mine)} answered ping")
    return ProbeResult(
        False,
        f"no {prefix}*@{host} answered ping within {timeout_s:g} s "
        f"({len(nodes)} other node(s) did); is `imgpipe {role}` running on this host?",
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def probe_ingest(settings: Settings, host: str, max_idle_s: float) -> ProbeResult:
    import redis

    from imgpipe.contracts import SUBMIT_GROUP, SUBMIT_STREAM

    client = redis.Redis.from_url(settings.effective_redis_url, socket_timeout=10)
    try:
        consumers = client.xinfo_consumers(SUBMIT_STREAM, SUBMIT_GROUP)
    except redis.ResponseError as exc:
        return ProbeResult(False, f"no consumer group {SUBMIT_GROUP} on {SUBMIT_STREAM}: {exc}")
    finally:
        client.close()
    names_idle_ms = [(_text(c["name"]), int(c["idle"])) for c in consumers]
    mine = [(name, idle) for name, idle in names_idle_ms if name.startswith(f"{host}-")]
    live = [name for name, idle_ms in mine if idle_ms <= max_idle_s * 1000]
    if live:
        return ProbeResult(True, f"{', '.join(live)} polling")
    return ProbeResult(
        False,
        f"no ingest consumer of host {host} polled within {max_idle_s:g} s "
        f"({len(mine)} idle longer); is `imgpipe ingest` running on this host?",
    )


def probe(
    settings: Settings,
    role: str,
    *,
    device: str | None = None,
    host: str | None = None,
    timeout_s: float = 5.0,
    max_idle_s: float = 60.0,
) -> ProbeResult:
    if role not in PROBE_ROLES:
        raise ValueError(f"probe role must be one of {', '.join(PROBE_ROLES)}, not {role!r}")
    host = host or socket.gethostname()
    if role == "ingest":
        return probe_ingest(settings, host, max_idle_s)
    return probe_worker(settings, role, device, host, timeout_s)
