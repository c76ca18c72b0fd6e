"""The visual HTML report of jobs (``imgpipe report``, ``imgpipe run --report``).

``collect`` reads the jobs from SQL and their images from the blob store into plain
views (``views``); ``render`` turns views into one self-contained HTML page (every image
a data: URI, no external asset). Nothing here writes to the database.
"""

from __future__ import annotations

from imgpipe.face.report.collect import collect_views, job_ids_since, parse_duration
from imgpipe.face.report.render import render_page
from imgpipe.face.report.write import write_report

__all__ = ["collect_views", "job_ids_since", "parse_duration", "render_page", "write_report"]
