"""The DIMSE status codes sortscp answers with (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

#: Success: the instance is on disk under its final name.
SUCCESS = 0x0000
#: Refused: Out of Resources. Disk full, unwritable folder, worker pool failure.
OUT_OF_RESOURCES = 0xA700
#: Error: Data Set does not match SOP Class (0xA900): the dataset's SOP Class or
#: Instance UID is not the command's (what DCMTK's storescp answers too).
DATA_SET_MISMATCH = 0xA900
#: Refused: SOP Class not supported (PS3.7 C.5.2): a C-STORE on a presentation
#: context of no storage class (Verification, the only other one accepted).
SOP_CLASS_NOT_SUPPORTED = 0x0122
#: Error: Cannot Understand (0xC000-0xCFFF). The dataset header cannot be read.
CANNOT_UNDERSTAND = 0xC000
#: Error: Cannot Understand, what pynetdicom answers for a C-STORE whose
#: ``EVT_C_STORE`` handler raised or returned no status (sortscp's never does).
HANDLER_FAILED = 0xC211
