"""Operator commands: database, pipelines, models, anomaly profiles, reaper."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imgpipe.errors import ImgpipeError
from imgpipe.extras import require_model_extra
from imgpipe.face.cli_console import console
from imgpipe.redact import redact_url
from imgpipe.settings import Settings

__all__ = ["register"]


db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
models_app = typer.Typer(help="Models this installation has loaded.", no_args_is_help=True)
anomaly_app = typer.Typer(help="Anomaly profiles.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply Alembic migrations to IMGPIPE_DATABASE_URL (default: SQLite in the data dir)."""
    from db.migrate import upgrade

    settings = Settings()
    upgrade(settings.effective_database_url, revision)
    console.print(f"database at {revision}: {redact_url(settings.effective_database_url)}")


def pipelines() -> None:
    """List pipelines, their stages and whether they can run here."""
    from orchestrator.pipelines import load_pipeline, pipeline_names

    settings = Settings()
    table = Table("pipeline", "stages", "runs here?")
    for name in pipeline_names(settings.pipelines_dir):
        try:
            spec = load_pipeline(name, settings.pipelines_dir)
        except ImgpipeError as exc:
            table.add_row(name, "", f"[red]invalid: {escape(str(exc))}[/]")
            continue
        try:
            spec.require_installed(on_this_host=True)
            ok = "[green]yes[/]"
        except ImgpipeError as exc:
            ok = f"[yellow]no: {escape(str(exc))}[/]"
        stages = ", ".join(
            f"{s.name}<-{'+'.join(s.needs)}" if s.needs else s.name for s in spec.stages
        )
        table.add_row(name, stages, ok)
    Console().print(table)


@models_app.command("list")
def models_list() -> None:
    """Models recorded in the database: name, version, weights sha256, license."""
    from sqlalchemy import select

    from db.engine import session_scope
    from db.models import ModelRecord

    settings = Settings()
    table = Table("name", "version", "weights sha256", "license", "source", "first loaded")
    with session_scope(settings.effective_database_url) as session:
        for m in session.execute(select(ModelRecord).order_by(ModelRecord.id)).scalars():
            table.add_row(
                m.name, m.version, m.weights_sha256[:16], m.license, m.source,
                m.first_loaded.isoformat(timespec="seconds"),
            )  # fmt: skip
    Console().print(table)


def reap_once() -> None:
    """Run the reaper once now (it also runs periodically in `imgpipe orchestrator`)."""
    from orchestrator.context import OrchestratorContext
    from orchestrator.reaper import reap

    report = reap(OrchestratorContext(Settings()))
    console.print(
        ", ".join(f"{name.replace('_', ' ')} {n}" for name, n in report.as_dict().items())
    )


def gc(
    apply: Annotated[
        bool, typer.Option("--apply", help="Delete; without it, only report (dry run).")
    ] = False,
    retention_s: Annotated[
        int | None,
        typer.Option(help="Keep unreferenced blobs younger than this (IMGPIPE_BLOB_RETENTION_S)."),
    ] = None,
) -> None:
    """Collect the blob store: working copies no queued or running job needs, then blobs
    no row names, older than the retention period. A dry run unless --apply."""
    import redis

    from db.blobs import LocalBlobStore, blob_store_for
    from db.gc import collect_working_copies
    from db.gc_orphans import collect_orphans
    from orchestrator.context import OrchestratorContext
    from orchestrator.ingest_dead import dead_letter_refs

    settings = Settings()
    ctx = OrchestratorContext(settings)
    store = blob_store_for(settings)
    if not isinstance(store, LocalBlobStore):
        raise ImgpipeError(f"imgpipe gc supports file:// blob stores, not {type(store)}")
    try:
        dead_refs = dead_letter_refs(ctx.events.client)
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise ImgpipeError(
            f"imgpipe gc keeps the blobs dead letters name, but cannot read them from "
            f"Redis ({exc}); start the stack (imgpipe up) or set IMGPIPE_REDIS_URL"
        ) from None
    copies = collect_working_copies(ctx.database_url, store, dry_run=not apply)
    orphans = collect_orphans(
        ctx.database_url,
        store,
        settings.blob_retention_s if retention_s is None else retention_s,
        dry_run=not apply,
        also_referenced=dead_refs,
    )
    verb = "deleted" if apply else "would delete (dry run; --apply to delete)"
    console.print(
        f"working copies: released {copies.images} image and {copies.stage_outputs} stage "
        f"copies; {verb} {len(copies.keys)} blobs, {copies.bytes_freed:,} bytes"
    )
    console.print(
        f"unreferenced blobs: scanned {orphans.scanned}, {orphans.referenced} named by a row "
        f"or dead letter, {orphans.young} younger than the retention period; {verb} "
        f"{orphans.deleted} blobs, {orphans.bytes:,} bytes"
        + (f" ({orphans.restored} named again meanwhile, kept)" if orphans.restored else "")
    )


@anomaly_app.command("fit")
def anomaly_fit(
    profile: Annotated[Path, typer.Argument(help="Where to write the profile.")],
    images: Annotated[list[Path], typer.Argument(help="Good images (files or dirs).")],
    name: Annotated[str | None, typer.Option(help="Profile name.")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    config: Annotated[
        str | None,
        typer.Option(
            help="Recipe overrides as a JSON object, e.g. '{\"colour_map\": true}' "
            "(FeatureConfig fields, docs/anomaly.md)."
        ),
    ] = None,
    coreset: Annotated[
        float | None,
        typer.Option(
            help="Fraction of the fit patches kept in the memory bank, in (0, 1] (default "
            "0.1); 0.05 halves the search time at about -0.003 mean AUROC on the suite "
            "(docs/anomaly.md)."
        ),
    ] = None,
) -> None:
    """Fit an anomaly profile on good images."""
    require_model_extra("imgpipe anomaly fit")
    from imgpipe.face.cli_anomaly import fit_command

    fit_command(profile, images, name or profile.stem, device, console, config, coreset)


@anomaly_app.command("eval")
def anomaly_eval(
    profile: Annotated[Path, typer.Argument()],
    good: Annotated[Path, typer.Option(help="Directory of good images.")],
    bad: Annotated[Path, typer.Option(help="Directory of defective images.")],
    device: Annotated[str, typer.Option()] = "cpu",
    masks: Annotated[
        Path | None,
        typer.Option(
            help="Directory of defect masks, one per bad image at the same path below it "
            "(any image suffix, or MVTec's NAME_mask.png; nonzero pixel = defect): adds the "
            "pixel AUROC of the heat maps."
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (stdout holds nothing else).")
    ] = False,
) -> None:
    """AUROC and the confusion at the calibrated threshold."""
    require_model_extra("imgpipe anomaly eval")
    from imgpipe.face.cli_anomaly import eval_command

    eval_command(profile, good, bad, device, console, masks=masks, json_out=json_out)


def register(app: typer.Typer) -> None:
    """Add these commands to the ``imgpipe`` app."""
    app.add_typer(db_app, name="db")
    app.add_typer(models_app, name="models")
    app.add_typer(anomaly_app, name="anomaly")
    app.command("pipelines")(pipelines)
    app.command("reap")(reap_once)
    app.command("gc")(gc)
