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
from imgpipe.redact import redact_url
from imgpipe.settings import Settings

__all__ = ["add_ops_commands"]


def add_ops_commands(app: typer.Typer, console: Console) -> None:
    db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
    models_app = typer.Typer(help="Models this installation has loaded.", no_args_is_help=True)
    anomaly_app = typer.Typer(help="Anomaly profiles.", no_args_is_help=True)
    blobs_app = typer.Typer(help="The blob store.", no_args_is_help=True)
    app.add_typer(db_app, name="db")
    app.add_typer(models_app, name="models")
    app.add_typer(anomaly_app, name="anomaly")
    app.add_typer(blobs_app, name="blobs")

    @db_app.command("upgrade")
    def db_upgrade(revision: str = "head") -> None:
        """Apply Alembic migrations to IMGPIPE_DATABASE_URL (default: SQLite in the data dir)."""
        from db.migrate import upgrade

        settings = Settings()
        upgrade(settings.effective_database_url, revision)
        console.print(f"database at {revision}: {redact_url(settings.effective_database_url)}")

    @app.command("pipelines")
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

    @app.command("reap")
    def reap_once() -> None:
        """Run the reaper once now (it also runs periodically in `imgpipe orchestrator`)."""
        from orchestrator.context import OrchestratorContext
        from orchestrator.reaper import reap

        report = reap(OrchestratorContext(Settings()))
        console.print(
            f"redispatched {report.redispatched}, dead {report.dead}, advanced {report.advanced}"
        )

    @blobs_app.command("gc")
    def blobs_gc(
        dry_run: Annotated[bool, typer.Option(help="Report, change nothing.")] = False,
    ) -> None:
        """Delete working copies no queued or running job needs (results are kept)."""
        from db.blobs import blob_store_for
        from db.gc import collect_working_copies

        settings = Settings()
        report = collect_working_copies(
            settings.effective_database_url,
            blob_store_for(settings),
            dry_run=dry_run,
        )
        verb = "would delete" if dry_run else "deleted"
        console.print(
            f"released {report.images} image and {report.stage_outputs} stage working "
            f"copies; {verb} {len(report.keys)} blobs ({report.bytes_freed:,} bytes freed), "
            f"{report.kept_shared} kept because other rows name them"
        )

    @anomaly_app.command("fit")
    def anomaly_fit(
        profile: Annotated[Path, typer.Argument(help="Where to write the profile.")],
        images: Annotated[list[Path], typer.Argument(help="Good images (files or dirs).")],
        name: Annotated[str | None, typer.Option(help="Profile name.")] = None,
        device: Annotated[str, typer.Option()] = "cpu",
    ) -> None:
        """Fit an anomaly profile on good images."""
        require_model_extra("imgpipe anomaly fit")
        from workers.anomaly.cli import fit_command

        fit_command(profile, images, name or profile.stem, device, console)

    @anomaly_app.command("eval")
    def anomaly_eval(
        profile: Annotated[Path, typer.Argument()],
        good: Annotated[Path, typer.Option(help="Directory of good images.")],
        bad: Annotated[Path, typer.Option(help="Directory of defective images.")],
        device: Annotated[str, typer.Option()] = "cpu",
    ) -> None:
        """AUROC and the confusion at the calibrated threshold."""
        require_model_extra("imgpipe anomaly eval")
        from workers.anomaly.cli import eval_command

        eval_command(profile, good, bad, device, console)
