"""``sortscp ls OUT``: the studies and series of the index, as rows or JSON.

Read-only: it never creates nor rebuilds the index (a missing index is an
error for the caller to report: :class:`NoIndex`).
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

from scp.errors import SortscpError
from scp.store.index import InstanceIndexError, SqliteIndex, index_path


class NoIndex(SortscpError):
    """There is no usable index under the output folder."""


def _local(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def listing(out: Path) -> list[dict[str, Any]]:
    """Every study of the index of `out` with its series, as plain dicts."""
    if not index_path(out).is_file():
        raise NoIndex(f"no index at {index_path(out)}: `sortscp serve --out {out}` creates it")
    try:
        index = SqliteIndex(out, read_only=True)
        try:
            studies = index.studies()
            series = index.series_list()
            of_series = index.studies_of_series()
        finally:
            index.close()
    except (InstanceIndexError, sqlite3.Error) as exc:  # damaged, not a database, locked
        raise NoIndex(f"cannot read the index of {out}: {exc}") from None
    except OSError as exc:  # its folder not writable (its lock file), unreadable
        raise NoIndex(f"cannot open the index of {out}: {exc.strerror}: {exc.filename}") from None
    by_study: dict[str | None, list[dict[str, Any]]] = {}
    for s in series:
        # (under each study its instances name: a series UID a sender gave two studies is in both)
        for study, n in (of_series.get(s.series_instance_uid) or {s.study_instance_uid: s.instances}).items():
            by_study.setdefault(study, []).append({
                "series_instance_uid": s.series_instance_uid,
                "folder": s.folder,
                "series_description": s.series_description,
                "series_number": s.series_number,
                "modality": s.modality,
                "instances": n,
                "complete": s.complete,
                "revision": s.revision,
                "first_arrival": _local(s.first_arrival),
                "last_arrival": _local(s.last_arrival),
            })
    return [
        {
            "study_instance_uid": t.study_instance_uid,
            "patient_name": t.patient_name,
            "patient_id": t.patient_id,
            "study_date": t.study_date,
            "instances": t.instances,
            "complete": t.complete,
            "revision": t.revision,
            "last_arrival": _local(t.last_arrival),
            "series": by_study.get(t.study_instance_uid, []),
        }
        for t in studies
    ]
