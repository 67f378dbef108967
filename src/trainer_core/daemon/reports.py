"""The report kept next to each finished file: ``<folder>/<id>-<name>.report.json``.

Fields: the ledger row (``id``, ``name``, ``sha256``, ``priority``, ``state``, ``attempts``,
``rows``, ``invalid_rows``, ``steps``, ``tokens``, ``step_before``, ``step_after``,
``loss_start``, ``loss_end``, ``checkpoint``, ``error``, ``duplicate_of`` and the timestamps,
as ISO 8601 UTC text),
``attempt_log`` (every attempt: outcome, steps, error) and, when the worker found invalid rows,
``problems`` (``line``, ``field``, ``reason``, ``detail`` for each).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer_core.daemon.home import REPORT_SUFFIX, Home
from trainer_core.daemon.ledger import Ledger
from trainer_core.files import write_json_atomic


def report_path(home: Home, row: dict[str, Any]) -> Path:
    return home.folder(row["state"]) / (row["fname"] + REPORT_SUFFIX)


def problems_path(home: Home, row: dict[str, Any]) -> Path:
    """Where the worker leaves the invalid rows it found (merged into the final report)."""
    return home.queue / f".{row['fname']}.problems.json"


def iso_times(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its ``*_at`` epoch seconds as ISO 8601 UTC text
    (``2026-12-05T03:40:14.123+00:00``); the ledger keeps the numbers."""
    import datetime as dt

    return {k: (dt.datetime.fromtimestamp(v, dt.timezone.utc).isoformat(timespec="milliseconds")
                if k.endswith("_at") and isinstance(v, (int, float)) and not isinstance(v, bool)
                else v) for k, v in record.items()}


def write_report(home: Home, ledger: Ledger, fid: int) -> Path:
    row = ledger.file(fid)
    attempts = [dict(r) for r in ledger.db.execute(
        "SELECT attempt, outcome, step_before, step_after, steps, tokens, loss_start, loss_end, "
        "error, started_at, finished_at FROM attempts WHERE file_id=? ORDER BY id", (fid,))]
    report: dict[str, Any] = iso_times({**row, "attempt_log": [iso_times(a) for a in attempts]})
    side = problems_path(home, row)
    if side.exists():
        report["problems"] = json.loads(side.read_text(encoding="utf-8"))
    path = report_path(home, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
    side.unlink(missing_ok=True)
    return path
