"""Baseline (c) of ``imgpipe bench --stages noop``: the DAG of the ``full`` pipeline as a
hand-written Celery canvas, ``q | group(e | d, a, m) | join`` (a chain into a chord),
with the no-op stage body of imgpipe's ``noop`` kind, on the same broker (its own queue)
with a result backend on the same Redis (another database number), consumed by a prefork
worker of the same concurrency as imgpipe's cpu worker, started here and stopped after.

The worker runs as ``python -m imgpipe.face.bench.canvas --broker URL --backend URL -c N``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from celery import Celery, chain, group

from imgpipe.celery_app import DELIVERY_SETTINGS
from imgpipe.face.bench.stats import summary

__all__ = ["CANVAS_QUEUE", "CanvasWorker", "create_canvas_app", "measure_canvas", "result_url"]

CANVAS_QUEUE = "imgpipe.bench.canvas"
NOOP_TASK = "imgpipe.bench.canvas.noop"
JOIN_TASK = "imgpipe.bench.canvas.join"
DONE_KEY = "imgpipe:bench:canvas:done"
STAGES = ("quality", "enhance", "detect", "anomaly", "moderate")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


BROKER_ENV = "IMGPIPE_BENCH_CANVAS_BROKER_URL"
BACKEND_ENV = "IMGPIPE_BENCH_CANVAS_BACKEND_URL"


def result_url(broker_url: str) -> str:
    """The result backend for the chord: the broker's Redis, the next database number."""
    parts = urlsplit(broker_url)
    if parts.scheme == "redis+socket":
        return f"{broker_url}{'&' if parts.query else '?'}virtual_host=1"
    if parts.scheme in ("redis", "rediss"):
        db = parts.path.strip("/")
        next_db = (int(db) + 1) % 16 if db.isdigit() else 1
        return urlunsplit(parts._replace(path=f"/{next_db}"))
    raise ValueError(f"the canvas baseline needs a Redis broker, not {parts.scheme}://")


def _noop_body(stage: str, upstream: object) -> dict[str, Any]:
    """The body of imgpipe's noop stage kind, called the way its worker calls it."""
    import numpy as np

    from workers.runtime import StageInput, StageOutput
    from workers.stages.noop import run_stage_batch

    needs = {"upstream": upstream} if isinstance(upstream, dict) else {}
    item = StageInput(np.zeros((16, 16, 3), np.uint8), (16, 16), {}, needs)
    result = run_stage_batch([item])[0]
    assert isinstance(result, StageOutput)
    return {"stage": stage, **result.output}


def create_canvas_app(broker_url: str, backend_url: str) -> Celery:
    """The canvas app, with imgpipe's non-optional settings (JSON only, late acks, reject
    on worker loss, prefetch 1) and a result backend, which the chord's join needs."""
    app = Celery("imgpipe-bench-canvas", broker=broker_url, backend=backend_url)
    app.conf.update(
        **DELIVERY_SETTINGS,
        task_default_queue=CANVAS_QUEUE,
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name=NOOP_TASK)  # type: ignore[untyped-decorator]
    def noop(upstream: object = None, *, stage: str) -> dict[str, Any]:
        return _noop_body(stage, upstream)

    @app.task(name=JOIN_TASK)  # type: ignore[untyped-decorator]
    def join(results: list[Any], *, dag: int) -> None:
        """Ends the DAG: pushes (dag, wall-clock time) onto DONE_KEY, which the client pops
        (so the client needs no result subscriptions, only the chord needs the backend)."""
        app.backend.client.rpush(DONE_KEY, json.dumps([dag, time.time()]))

    return app


def full_shaped_canvas(app: Celery, dag: int) -> Any:
    def stage(name: str) -> Any:
        return app.signature(NOOP_TASK, kwargs={"stage": name}, queue=CANVAS_QUEUE)

    q, e, d, a, m = (stage(n) for n in STAGES)
    join = app.signature(JOIN_TASK, kwargs={"dag": dag}, queue=CANVAS_QUEUE)
    return chain(q, group(chain(e, d), a, m), join)


def redis_py_url(backend_url: str) -> str:
    """The result backend's Redis as a redis-py URL."""
    if backend_url.startswith("redis+socket://"):
        return "unix://" + backend_url.removeprefix("redis+socket://").replace(
            "virtual_host=", "db="
        )
    return backend_url


def _wait_done(done_queue: redis.Redis, count: int, timeout_s: float) -> dict[int, float]:
    """Pop ``count`` (dag, end time) entries pushed by the join task."""
    done: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < count:
        # short blocking pops: a pop longer than the client's socket timeout would end in
        # a read timeout on a loaded machine instead of an answer
        popped = done_queue.blpop([DONE_KEY], timeout=1)
        if popped is None:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{count - len(done)} canvas DAGs unfinished after {timeout_s} s"
                )
            continue
        dag, end = json.loads(popped[1])
        done[int(dag)] = float(end)
    return done


class CanvasWorker:
    """The canvas worker subprocess, in its own session so that stopping it stops its
    pool children too."""

    def __init__(
        self, broker_url: str, backend_url: str, concurrency: int, env: dict[str, str], log: Path
    ) -> None:
        self.node = f"canvas-{os.getpid()}@{socket.gethostname()}"
        self.command = [
            sys.executable, "-m", "imgpipe.face.bench.canvas",
            "--concurrency", str(concurrency), "--node", self.node,
        ]  # fmt: skip
        # URLs may hold passwords: in the environment, never on the command line.
        self.env = {**env, BROKER_ENV: broker_url, BACKEND_ENV: backend_url}
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, app: Celery) -> None:
        from imgpipe.face.stopsignals import signals_deferred

        # a stop signal between starting the worker and recording it would orphan it
        with signals_deferred(), self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not app.control.ping(destination=[self.node], timeout=0.5):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(
                    "the canvas worker did not answer a ping within "
                    f"{READY_TIMEOUT_S:.0f} s; the end of its log:\n" + "\n".join(tail)
                )

    def stop(self) -> None:
        if self.process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(wait_s)
        self.process = None


def _unsubscribe_all(app: Celery) -> None:
    """Sending a chord subscribes the client to its header's results; unsubscribe while
    Redis is up, or the results' finalisers retry against a stopped server at exit."""
    consumer = app.backend.result_consumer
    for key in list(consumer.subscribed_to):
        consumer.cancel_for(key.decode().removeprefix(app.backend.task_keyprefix.decode()))


def measure_canvas(
    app: Celery,
    backend_url: str,
    dags: int,
    latency_dags: int,
    warmup_dags: int = 3,
    timeout_s: float = 600,
    cpu_probe: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Latency (one DAG at a time) and throughput (``dags`` sent at once) of the canvas.
    A DAG's latency runs from just before ``apply_async`` to the join task's end. Each
    DAG is a new canvas: a signature applied twice would reuse its frozen task ids."""
    done_queue = redis.Redis.from_url(redis_py_url(backend_url))
    done_queue.delete(DONE_KEY)

    def run_one(dag: int) -> float:
        t0 = time.time()
        full_shaped_canvas(app, dag).apply_async()
        return (_wait_done(done_queue, 1, timeout_s)[dag] - t0) * 1000

    for dag in range(warmup_dags):
        run_one(dag)
    latency = [run_one(dag) for dag in range(latency_dags)]
    sent: dict[int, float] = {}
    cpu_before_s = cpu_probe() if cpu_probe else None
    for dag in range(dags):
        sent[dag] = time.time()
        full_shaped_canvas(app, dag).apply_async()
    ends = _wait_done(done_queue, dags, timeout_s)
    cpu_ms_per_dag = (
        None
        if cpu_probe is None or cpu_before_s is None
        else round((cpu_probe() - cpu_before_s) * 1000 / dags, 2)
    )
    done_queue.close()
    _unsubscribe_all(app)
    wall_s = max(ends.values()) - sent[0]
    return {
        "shape": "q | group(e | d, a, m) | join",
        "latency": {"dags": latency_dags, "e2e_ms": summary(latency)},
        "throughput": {
            "dags": dags,
            "wall_s": round(wall_s, 3),
            "dags_per_s": round(dags / wall_s, 3),
            "cpu_ms_per_dag": cpu_ms_per_dag,
            "e2e_ms": summary((ends[dag] - at) * 1000 for dag, at in sent.items()),
        },
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The canvas baseline's worker.")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--node", default=f"canvas-{os.getpid()}@{socket.gethostname()}")
    args = parser.parse_args(argv)
    missing = [name for name in (BROKER_ENV, BACKEND_ENV) if not os.environ.get(name)]
    if missing:
        parser.error(f"set {' and '.join(missing)} (broker and result backend URLs)")
    app = create_canvas_app(os.environ[BROKER_ENV], os.environ[BACKEND_ENV])
    argv = [
        "worker", "--queues", CANVAS_QUEUE, "--concurrency", str(args.concurrency),
        "--pool", "prefork", "--hostname", args.node, "--loglevel", "WARNING",
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    app.worker_main(argv)


if __name__ == "__main__":
    main()
