"""One ``imgpipe bench`` run: baselines in this process, then the stack, then (for
``--stages noop``) the Celery canvas on the same broker; one report dict."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from imgpipe.face.bench.machine import (
    GpuSampler,
    cpu_s_of_groups,
    machine_info,
    rss_mib,
    rss_mib_of_group,
)
from imgpipe.face.bench.stats import ratio
from imgpipe.redact import redact_url
from imgpipe.settings import Settings

if TYPE_CHECKING:
    from imgpipe.face.bench.phases import JobsDone
    from imgpipe.face.stack import Stack

__all__ = ["BenchConfig", "default_images", "run_bench", "tiny_images"]

SAMPLES_DIR = Path(__file__).resolve().parents[3] / "samples"  # imgpipe/face/bench -> repo
DEFAULT_SIZE = (1920, 1080)
NOOP_PIPELINE = "noop"
NOOP_IMAGE_PX = 16
NOOP_DISTINCT_IMAGES = 4

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    images: int = 200
    """Jobs in the throughput phase (submitted at once)."""
    pipeline: str = "full"
    noop: bool = False
    """Run the ``noop`` pipeline on tiny images and measure the Celery canvas baseline."""
    device: str = "cpu"
    database_url: str | None = None
    broker_url: str | None = None
    image_paths: tuple[Path, ...] = ()
    """Inputs, repeated; empty: the 1920x1080 samples (tiny PNGs with ``noop``)."""
    latency_jobs: int = 20
    """Jobs (and canvas DAGs) run one at a time for the unloaded latency."""
    warmup_jobs: int = 3
    baseline_images: int = 20
    """Images timed in the sequential baseline (at least two passes over the inputs)."""
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    timeout_s: float = 1800
    command: str = ""


def default_images() -> list[tuple[str, bytes]]:
    """``samples/photo_1080p.jpg`` as it is, and every other sample photograph (clean and
    degraded) resized and centre-cropped to 1920x1080, JPEG quality 90, in memory."""
    from PIL import Image, ImageOps

    primary = SAMPLES_DIR / "photo_1080p.jpg"
    if not primary.is_file():
        raise FileNotFoundError(f"{primary} is missing; pass --image PATH")
    found = [(str(primary), primary.read_bytes())]
    for path in sorted(SAMPLES_DIR.glob("*.jpg")) + sorted(SAMPLES_DIR.glob("degraded/*.jpg")):
        if path == primary:
            continue
        with Image.open(path) as im:
            fitted = ImageOps.fit(im.convert("RGB"), DEFAULT_SIZE, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        fitted.save(buffer, "JPEG", quality=90)
        found.append((f"{path} fitted to {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}", buffer.getvalue()))
    return found


def tiny_images(count: int = NOOP_DISTINCT_IMAGES, px: int = NOOP_IMAGE_PX) -> list[bytes]:
    """``count`` distinct PNGs of ``px`` x ``px`` noise (seeded: the same every run)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (px, px, 3), np.uint8)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def _redact(url: SecretStr | None, default: str) -> str:
    """What the report says about a server: its URL without credentials."""
    return default if url is None else redact_url(url.get_secret_value())


def run_bench(
    config: BenchConfig,
    progress: Progress = lambda _: None,
    jobs_done: JobsDone | None = None,
) -> dict[str, Any]:
    from imgpipe.face.bench.baselines import (
        batched_baseline,
        model_stages,
        release_device_memory,
        sequential_baseline,
    )
    from orchestrator.context import OrchestratorContext
    from orchestrator.pipelines import load_pipeline
    from orchestrator.submit import resolve_spec

    pipeline = NOOP_PIPELINE if config.noop else config.pipeline
    if config.noop:
        names, images = ["tiny PNG"], tiny_images()
    else:
        given = [(str(p), p.read_bytes()) for p in config.image_paths]
        names, images = map(list, zip(*(given or default_images()), strict=True))
    data_dir = Path(tempfile.mkdtemp(prefix="ipbench-", dir="/tmp"))  # short: unix socket
    settings = Settings(data_dir=data_dir)
    if config.database_url is not None:
        settings = settings.model_copy(update={"database_url": SecretStr(config.database_url)})
    if config.broker_url is not None:
        settings = settings.model_copy(update={"broker_url": SecretStr(config.broker_url)})
    started = datetime.now(UTC)
    report: dict[str, Any] = {
        "command": config.command,
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(config.device),
        "config": {
            "pipeline": pipeline,
            "stages": "noop" if config.noop else "pipeline",
            "images": config.images,
            "latency_jobs": config.latency_jobs,
            "distinct_inputs": len(images),
            "inputs": names,
            "device": config.device,
            "database": _redact(settings.database_url, "sqlite (embedded)"),
            "broker": _redact(settings.broker_url, "redis (embedded)"),
            "cpu_worker_concurrency": settings.cpu_concurrency,
        },
    }
    try:
        spec = load_pipeline(pipeline, settings.pipelines_dir)
        spec.require_installed(on_this_host=True)
        resolved = resolve_spec(OrchestratorContext(settings), spec, None)
        progress("in-process sequential baseline")
        runs = max(config.baseline_images, 2 * len(images))
        sequential, inputs = sequential_baseline(images, resolved, config.device, runs)
        models = model_stages(resolved)
        progress("in-process batched baseline" if models else "no model stages to batch")
        kinds = {n: s["kind"] for n, s in resolved["stages"].items()}
        batched = batched_baseline(inputs, models, kinds, config.batch_sizes)
        del inputs
        release_device_memory(config.device)
        report["baselines"] = {"in_process_sequential": sequential, "in_process_batched": batched}
        report["imgpipe"], canvas = _through_the_stack(
            config, settings, pipeline, images, progress, jobs_done
        )
        report["baselines"]["celery_canvas"] = canvas
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    report["ratios"] = _ratios(report)
    report["targets"] = _targets(report)
    return report


def _through_the_stack(
    config: BenchConfig,
    settings: Settings,
    pipeline: str,
    images: Sequence[bytes],
    progress: Progress,
    jobs_done: JobsDone | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from imgpipe.face.bench.phases import run_jobs
    from imgpipe.face.stack import Stack
    from imgpipe.stagekinds import GPU_STAGE_KINDS
    from orchestrator.context import OrchestratorContext
    from orchestrator.pipelines import load_pipeline

    spec = load_pipeline(pipeline, settings.pipelines_dir)
    needs_gpu = any(s.kind in GPU_STAGE_KINDS for s in spec.stages)
    roles = ("orchestrator", "cpu", "gpu") if needs_gpu else ("orchestrator", "cpu")
    # Workers record metrics into multi-process files, served on a free port, as under
    # `imgpipe up`: the figures include what metrics cost the stage path.
    stack = Stack(
        settings, workers=roles, gpu_device=config.device, metrics_port=0, metrics_required=False
    )
    with stack:
        progress("starting the stack")
        stack.wait_ready()
        ctx = OrchestratorContext(settings)

        def jobs(count: int, at_once: bool) -> tuple[dict[str, Any], float]:
            return run_jobs(
                ctx, stack, pipeline, images, count, at_once, config.timeout_s,
                jobs_done or (lambda _done, _total: None),
            )  # fmt: skip

        progress(f"warm-up: {config.warmup_jobs} jobs")
        jobs(config.warmup_jobs, at_once=False)
        progress(f"latency: {config.latency_jobs} jobs one at a time")
        latency, _ = jobs(config.latency_jobs, at_once=False)
        progress(f"throughput: {config.images} jobs at once")
        sampler = GpuSampler(config.device).start()
        groups = _stack_groups(stack)
        cpu_before_s = cpu_s_of_groups(groups)
        throughput, wall_s = jobs(config.images, at_once=True)
        cpu_ms_per_job = (cpu_s_of_groups(groups) - cpu_before_s) * 1000 / config.images
        gpu = sampler.stop()
        throughput = {
            "wall_s": round(wall_s, 3),
            "images_per_s": round(config.images / wall_s, 3),
            "cpu_ms_per_job": round(cpu_ms_per_job, 2),
        } | throughput
        rss: dict[str, float | None] = {
            c.name: rss_mib_of_group(c.process.pid) for c in stack.children
        }
        if stack.broker is not None and stack.broker.process is not None:
            rss["redis-server"] = rss_mib_of_group(stack.broker.process.pid)
        rss["bench (this process)"] = rss_mib(os.getpid())
        canvas = _canvas(config, settings, stack, progress) if config.noop else None
        if canvas is not None:
            rss["canvas worker"] = canvas.pop("rss_mib")
    result = {"latency": latency, "throughput": throughput, "rss_mib": rss, "gpu": gpu}
    return result, canvas


def _stack_groups(stack: Stack) -> set[int]:
    """The process groups of the stack's workers and its embedded broker (not this process:
    its submitting and polling are the client's cost, the same for both sides)."""
    groups = {c.process.pid for c in stack.children}
    if stack.broker is not None and stack.broker.process is not None:
        groups.add(stack.broker.process.pid)
    return groups


def _canvas(
    config: BenchConfig, settings: Settings, stack: Stack, progress: Progress
) -> dict[str, Any]:
    from imgpipe.face.bench.canvas import (
        CanvasWorker,
        create_canvas_app,
        measure_canvas,
        result_url,
    )
    from imgpipe.face.stack import child_env

    broker = settings.effective_broker_url
    backend = result_url(broker)
    app = create_canvas_app(broker, backend)
    worker = CanvasWorker(
        broker,
        backend,
        settings.cpu_concurrency,
        child_env(settings),
        stack.log_dir / "canvas.log",
    )
    progress(f"Celery canvas baseline: prefork -c {settings.cpu_concurrency}")
    try:
        worker.start(app)
        assert worker.process is not None
        broker_groups = _stack_groups(stack) - {c.process.pid for c in stack.children}
        groups = {worker.process.pid, *broker_groups}
        figures = measure_canvas(
            app,
            backend,
            config.images,
            config.latency_jobs,
            config.warmup_jobs,
            cpu_probe=lambda: cpu_s_of_groups(groups),
        )
        figures["rss_mib"] = rss_mib_of_group(worker.process.pid)
        figures["worker_concurrency"] = settings.cpu_concurrency
        return figures
    finally:
        worker.stop()
        app.close()


def _get(report: dict[str, Any], *path: str) -> Any:
    value: Any = report
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _ratios(report: dict[str, Any]) -> dict[str, float | None]:
    """imgpipe's figure divided by the baseline's (throughput: > 1 is faster than the
    baseline; latency: < 1 is faster)."""
    rate = _get(report, "imgpipe", "throughput", "images_per_s")
    return {
        "throughput_vs_in_process_sequential": ratio(
            rate, _get(report, "baselines", "in_process_sequential", "images_per_s")
        ),
        "throughput_vs_in_process_batched_model_stages": ratio(
            rate, _get(report, "baselines", "in_process_batched", "model_stages_images_per_s")
        ),
        "throughput_vs_celery_canvas": ratio(
            rate, _get(report, "baselines", "celery_canvas", "throughput", "dags_per_s")
        ),
        "latency_p50_vs_in_process_sequential": ratio(
            _get(report, "imgpipe", "latency", "e2e_from_submit_call_ms", "p50"),
            _get(report, "baselines", "in_process_sequential", "p50_ms"),
        ),
        "latency_p50_vs_celery_canvas": ratio(
            _get(report, "imgpipe", "latency", "e2e_from_submit_call_ms", "p50"),
            _get(report, "baselines", "celery_canvas", "latency", "e2e_ms", "p50"),
        ),
        "cpu_per_job_vs_celery_canvas": ratio(
            _get(report, "imgpipe", "throughput", "cpu_ms_per_job"),
            _get(report, "baselines", "celery_canvas", "throughput", "cpu_ms_per_dag"),
        ),
    }


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets that this run can check (docs/benchmarks.md)."""
    ratios = report["ratios"]
    checks: list[tuple[str, Any, str, float]] = []
    if report["config"]["stages"] == "noop":
        checks += [
            ("noop DAGs/s vs the canvas", ratios["throughput_vs_celery_canvas"], ">=", 1.0),
            ("noop p50 vs the canvas", ratios["latency_p50_vs_celery_canvas"], "<=", 1.5),
        ]
    elif report["config"]["pipeline"] == "full":
        checks.append(
            ("full images/s vs in-process sequential",
             ratios["throughput_vs_in_process_sequential"], ">=", 1.2)
        )  # fmt: skip
    for name, stage in (_get(report, "imgpipe", "latency", "stages") or {}).items():
        value = _get(stage, "bookkeeping_plus_hop_ms", "p50")
        checks.append((f"{name}: bookkeeping + hop p50 ms (unloaded)", value, "<=", 3.0))
    return [
        {
            "target": name,
            "value": value,
            "goal": f"{op} {goal}",
            "met": None if value is None else (value >= goal if op == ">=" else value <= goal),
        }
        for name, value, op, goal in checks
    ]
