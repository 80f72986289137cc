"""The header the network thread keeps while a dataset arrives
(:meth:`scp.net.sink.IncomingDataset.header`) names the file as reading the
received file's header would (what the worker did before), for every bundled
file and several templates, in any chunking."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from scp.config import ServeConfig
from scp.dicom.header import _parse_meta, read_header
from scp.errors import NotDicomError
from scp.jobs import FACT_KEYWORDS, _dataset_from_header, header_tags, instance_facts, named_from_header
from scp.layout import DEFAULT_TEMPLATE, Template, raw_texts, relative_path, relative_path_raw
from scp.net.sink import IncomingDataset

from conftest import readable_dicom_files

TEMPLATES = [
    Template.parse(DEFAULT_TEMPLATE),
    Template.parse("{StudyDate}/{Modality}_{SeriesNumber:04}/{AccessionNumber}_{SOPInstanceUID}.dcm"),
]
FILES = readable_dicom_files()


def _received(path: Path, folder: Path, keep: tuple[int, ...], chunk: int) -> IncomingDataset | None:
    """`path`'s dataset as a sender would send it, through the sink."""
    data = path.read_bytes()
    parsed = _parse_meta(data[:1 << 16], 0)
    if parsed is None:
        return None
    meta, start = parsed
    def text(tag: int) -> str:
        elem = meta.get(tag)  # type: ignore[call-overload]
        return elem.value.decode("ascii", "replace").strip("\0 ") if elem is not None else ""
    sink = IncomingDataset(
        folder, sop_class_uid=text(0x00020002), sop_instance_uid=text(0x00020003),
        transfer_syntax=text(0x00020010), calling_aet="SENDER", keep=keep,
    )
    body = memoryview(data)[start:]
    for i in range(0, len(body), chunk):
        sink.write(body[i:i + chunk])
    sink.finish()
    sink.close()
    return sink


@pytest.mark.parametrize("template", TEMPLATES, ids=["default", "other"])
def test_kept_header_names_every_file_as_the_file_read_does(tmp_path, template) -> None:
    cfg = ServeConfig(out=tmp_path, template=template)
    keep = header_tags(cfg)
    kept = compared = raw = 0
    mismatches = []
    for n, path in enumerate(FILES):
        sink = _received(path, tmp_path, keep, chunk=(1000, 16384)[n % 2])
        if sink is None or sink.problem is not None or sink.error is not None:
            continue
        header = sink.header()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ref = read_header(sink.name, (*template.keywords, *FACT_KEYWORDS), identity_from_meta=False)
            except NotDicomError:
                ref = None
            Path(sink.name).unlink()
            if header is None:
                continue
            kept += 1
            if ref is None:
                mismatches.append((path.name, "the file read refuses it"))
                continue
            ds = _dataset_from_header(header)
            if relative_path(ds, template) != relative_path(ref, template):
                mismatches.append((path.name, relative_path(ds, template), relative_path(ref, template)))
            if instance_facts(ds, 1, "A") != instance_facts(ref, 1, "A"):
                mismatches.append((path.name, instance_facts(ds, 1, "A"), instance_facts(ref, 1, "A")))
            # what the worker uses: from the raw bytes where it can, else through pydicom
            named = named_from_header(header, template, 1, "A")
            expected = (relative_path(ref, template), str(ref.SOPInstanceUID), instance_facts(ref, 1, "A"))
            if named != expected:
                mismatches.append((path.name, "raw", named, expected))
            # (the worker's raw branch: the path and the facts both from the raw values)
            texts = raw_texts(header.elements, (*FACT_KEYWORDS, "SOPInstanceUID"))
            raw += relative_path_raw(header.elements, template) is not None \
                and texts is not None and bool(texts["SOPInstanceUID"])
            compared += 1
    assert not mismatches, mismatches[:5]
    assert compared >= 200 and kept >= len(FILES) * 0.8, (compared, kept, len(FILES))
    assert raw >= compared * 0.6, f"the raw path named only {raw} of {compared} files"


def test_no_header_without_wanted_tags_or_for_deflated_data(tmp_path) -> None:
    keep = header_tags(ServeConfig(out=tmp_path))
    sinks = [_received(p, tmp_path, keep, chunk=4096) for p in FILES if p.name == "image_dfl.dcm"]
    stored = [s for s in sinks if s is not None and s.problem is None and s.error is None]
    assert stored
    assert all(s.header() is None for s in stored)  # the worker reads these from the file
    sink = _received(FILES[0], tmp_path, (), chunk=4096)
    assert sink is not None and sink.header() is None


def test_a_multi_valued_uid_is_a_fact_as_the_header_holds_it() -> None:
    """A UI with two values gave the index (and the events and the manifest's
    name) "['1.2.3', '1.2.4']": a UID that appears nowhere in the data."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesInstanceUID = ["1.2.3", "1.2.4"]
    ds.PatientName = ["Doe^John", "Roe^Jane"]
    facts = instance_facts(ds, 1, "A")
    assert facts["series_instance_uid"] == "1.2.3\\1.2.4"
    assert facts["patient_name"] == "Doe^John\\Roe^Jane"
