"""Series and study manifests: what a completed series (study) holds, as JSON.

``OUT/.sortscp/series/<SeriesInstanceUID>.json`` and
``OUT/.sortscp/studies/<StudyInstanceUID>.json``, written atomically
(temporary file in the same folder, fsync, :func:`os.replace`, fsync of the
folder): a reader sees the previous manifest or the new one, never a part.
A later revision of the same series replaces the file.

The builders are pure (index records in, a dict out); :func:`stage_json`,
:func:`publish_json` and :func:`file_digests` do the I/O. Each instance's ``digest`` is the
SHA-256 of its file as stored, computed when the series completes (serve
leaves it out of the index, to keep a read of every file off the C-STORE
path).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scp.store.index import (
    MANIFEST_FOLDERS,
    InstanceRow,
    SeriesState,
    StudyState,
    manifest_name,
    sha256_file,
    state_dir,
)

MANIFEST_VERSION = 1
SERIES_DIRNAME = MANIFEST_FOLDERS["series"]
STUDIES_DIRNAME = MANIFEST_FOLDERS["studies"]


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def series_manifest_path(out: Path, series_uid: str) -> Path:
    return state_dir(out) / SERIES_DIRNAME / manifest_name(series_uid)


def study_manifest_path(out: Path, study_uid: str) -> Path:
    return state_dir(out) / STUDIES_DIRNAME / manifest_name(study_uid)


def file_digests(out: Path, rows: Sequence[InstanceRow]) -> dict[str, str | None]:
    """SHA-256 of each row's file under `out`, by SOPInstanceUID (None: the
    file cannot be read now; the row's own digest is used if it has one)."""
    found: dict[str, str | None] = {}
    for r in rows:
        try:
            found[r.sop_instance_uid] = sha256_file(out / r.path) if r.path else r.digest
        except OSError:
            found[r.sop_instance_uid] = r.digest
    return found


def series_manifest(series: SeriesState, rows: Sequence[InstanceRow],
                    digests: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """The manifest of `series` at its revision, from its committed instance
    rows; `digests` (by SOPInstanceUID, :func:`file_digests`) override the rows' own."""
    digests = digests or {}
    instances = [
        {
            "sop_instance_uid": r.sop_instance_uid,
            "path": r.path,
            "size": r.size,
            "digest": digests.get(r.sop_instance_uid, r.digest),
            "sop_class_uid": r.sop_class_uid,
            "transfer_syntax_uid": r.transfer_syntax_uid,
            "calling_aet": r.calling_aet,
            "received": _iso(r.received),
        }
        for r in rows
    ]
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": "series",
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study_instance_uid,
        "revision": series.revision,
        "folder": series.folder,
        "patient_name": series.patient_name,
        "patient_id": series.patient_id,
        "study_date": series.study_date,
        "series_description": series.series_description,
        "series_number": series.series_number,
        "modality": series.modality,
        "instance_count": len(instances),
        "total_bytes": sum(r.size or 0 for r in rows),
        "sop_classes": sorted({r.sop_class_uid for r in rows if r.sop_class_uid}),
        "transfer_syntaxes": sorted({r.transfer_syntax_uid for r in rows if r.transfer_syntax_uid}),
        "calling_aets": sorted({r.calling_aet for r in rows if r.calling_aet}),
        "first_arrival": _iso(series.first_arrival),
        "last_arrival": _iso(series.last_arrival),
        "completed_at": _iso(datetime.now(timezone.utc).timestamp()),
        "instances": instances,
    }


def study_manifest(study: StudyState, series: Sequence[tuple[SeriesState, Sequence[InstanceRow]]],
                   out: Path) -> dict[str, Any]:
    """The manifest of `study`: its series (each with its own manifest's path)."""
    entries = []
    aets: set[str] = set()
    for s, rows in series:
        aets.update(r.calling_aet for r in rows if r.calling_aet)
        entries.append({
            "series_instance_uid": s.series_instance_uid,
            "folder": s.folder,
            "series_description": s.series_description,
            "series_number": s.series_number,
            "modality": s.modality,
            "instance_count": len(rows),
            "total_bytes": sum(r.size or 0 for r in rows),
            "revision": s.revision,
            "manifest": os.path.relpath(series_manifest_path(out, s.series_instance_uid), out),
        })
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": "study",
        "study_instance_uid": study.study_instance_uid,
        "revision": study.revision,
        "patient_name": study.patient_name,
        "patient_id": study.patient_id,
        "study_date": study.study_date,
        "series_count": len(entries),
        "instance_count": sum(e["instance_count"] for e in entries),
        "total_bytes": sum(e["total_bytes"] for e in entries),
        "calling_aets": sorted(aets),
        "first_arrival": _iso(study.first_arrival),
        "last_arrival": _iso(study.last_arrival),
        "completed_at": _iso(datetime.now(timezone.utc).timestamp()),
        "series": entries,
    }


#: How :func:`stage_json` names a manifest being written, beside the manifests.
_PART_PREFIX, _PART_SUFFIX = ".tmp-", ".json"


def stage_json(path: Path, data: dict[str, Any]) -> Path:
    """`data` written and flushed beside `path`, under a temporary name
    (``.tmp-*.json``), not yet at `path`: :func:`publish_json` puts it there.
    A manifest is staged before its completion is flipped in the index and
    published only after, so a manifest at its own name always tells a
    completion that happened (what a rebuild of the index trusts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_PART_PREFIX, suffix=_PART_SUFFIX)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        discard_staged(Path(tmp))
        raise
    return Path(tmp)


def publish_json(staged: Path, path: Path) -> None:
    """Rename the `staged` file to `path` and flush its folder."""
    os.replace(staged, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def discard_staged(staged: Path) -> None:
    try:
        os.unlink(staged)
    except OSError:
        pass


def settle_staged_manifests(out: Path, completed: Callable[[str, str], int | None]) -> tuple[int, int]:
    """At a server's start, the manifests left under their temporary names
    in `out`'s manifest folders (``.tmp-*.json``): one whose completion the
    index holds (`completed(kind, uid)`, ``series`` or ``study``, gives that
    revision) was flipped and not yet renamed when the server was killed, and
    is put at its name now; the others (written half, or never flipped) are
    removed: never read, but a pipeline that picks up every ``*.json`` there
    with its dot files would take them. (published, removed). Only the
    server writes manifests, and it holds the folder (one server per
    folder), so no write is under way."""
    published = removed = 0
    for folder, kind, key, named in ((SERIES_DIRNAME, "series", "series_instance_uid", series_manifest_path),
                                     (STUDIES_DIRNAME, "study", "study_instance_uid", study_manifest_path)):
        where = state_dir(out) / folder
        try:
            with os.scandir(where) as it:
                names = [e.name for e in it if e.name.startswith(_PART_PREFIX) and e.name.endswith(_PART_SUFFIX)
                         and e.is_file(follow_symlinks=False)]
        except OSError:  # (no such folder yet)
            continue
        for name in names:
            staged = where / name
            manifest = _staged_manifest(staged, key)
            try:  # (its name, if its completion was flipped)
                flipped = named(out, manifest[0]) if manifest and completed(kind, manifest[0]) == manifest[1] else None
            except Exception:  # (the index cannot tell now: left for the next start)
                continue
            try:
                if flipped is not None:
                    publish_json(staged, flipped)
                    published += 1
                else:
                    os.unlink(staged)
                    removed += 1
            except OSError:
                pass
    return published, removed


def _staged_manifest(staged: Path, key: str) -> tuple[str, int] | None:
    """The UID (its `key`) and revision of the manifest staged at `staged`;
    None if it does not read as one (written half)."""
    try:
        with open(staged, encoding="utf-8") as f:
            data = json.load(f)
        uid, revision = data[key], data["revision"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (uid, revision) if isinstance(uid, str) and type(revision) is int else None
