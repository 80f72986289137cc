"""Command UIDs that cannot name a file: refused, never filed over another
instance's file; a C-STORE without the UIDs pynetdicom needs to answer it is
aborted, not left hanging with its dataset on disk."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.uid import generate_uid
from test_serve_hostile import (
    CT_CONTEXT,
    FAST,
    ct_bytes,
    ct_dataset,
    layout_files,
    log_lines,
    no_temp_files_within,
    raw_store,
    still_serving,
)

from scp.net.status import CANNOT_UNDERSTAND, SUCCESS

import pdu
from conftest import run_cli
from pdu import Peer

LAST = pdu.LAST


@pytest.mark.parametrize("uid", ["1.2/3", "1.2_3", "..", ".", ".5", "1.2 3", "1.2.\x1b[31mRED"])
def test_a_uid_that_cannot_name_a_file_is_refused(serve_process, uid):
    server = serve_process(*FAST)
    _, data, _ = ct_bytes(uid)
    status = raw_store(server.port, uid, data)
    assert status == CANNOT_UNDERSTAND, f"{uid!r}: status 0x{status:04X}\n{server.log()}"
    assert layout_files(server.out) == []
    assert no_temp_files_within(server.out) == []
    assert len(log_lines(server, r"is not a valid UID")) == 1, server.log()
    assert "\x1b" not in server.log()
    still_serving(server)


def test_two_uids_that_sanitize_alike_never_share_a_file(serve_process):
    server = serve_process(*FAST)
    good = "1.2.826.0.1.3680043.2.1143.77"
    _, data, _ = ct_bytes(good)
    assert raw_store(server.port, good, data) == SUCCESS
    stored = layout_files(server.out)
    before = stored[0].read_bytes()
    # a look-alike that a sanitized file name would map onto the same name
    twin = good.replace(".77", "/77").replace(".", "_", 1)
    _, data, _ = ct_bytes(twin)
    assert raw_store(server.port, twin, data) == CANNOT_UNDERSTAND
    assert layout_files(server.out) == stored and stored[0].read_bytes() == before


@pytest.mark.parametrize("missing", ["AffectedSOPInstanceUID", "AffectedSOPClassUID"])
def test_c_store_without_its_uids_is_aborted_and_leaves_nothing(serve_process, missing):
    server = serve_process(*FAST)
    uid, data, _ = ct_bytes()
    command = pdu.c_store_rq(
        "" if missing == "AffectedSOPClassUID" else pdu.CT_IMAGE_STORAGE,
        "" if missing == "AffectedSOPInstanceUID" else uid,
    )
    with Peer(server.port, timeout=10) as peer:
        cid = peer.associate(CT_CONTEXT).accepted_ids()[0]
        peer.send_command(cid, command)
        try:
            peer.send(pdu.p_data((cid, LAST, data[:16000])))
        except OSError:
            pass  # already aborted
        closed = peer.closed_within(10)
    assert closed is not None, "the association was left open, waiting for an answer that never comes"
    assert layout_files(server.out) == []
    assert no_temp_files_within(server.out) == []
    assert log_lines(server, f"without {missing}"), server.log()
    still_serving(server)


def test_reindex_escapes_what_files_carry(tmp_path):
    out = tmp_path / "out"
    folder = out / "P" / "S"
    folder.mkdir(parents=True)
    ds = ct_dataset(generate_uid())
    ds.SOPInstanceUID = "1.2.\x1b[31mRED\x1b[0m.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(folder / "odd.dcm", enforce_file_format=True)
    pydicom.dcmread(folder / "odd.dcm")  # a real, readable file
    done = run_cli("reindex", out, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\x1b" not in done.stdout + done.stderr, repr(done.stderr)
