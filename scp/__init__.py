"""sortscp: a DICOM Storage SCP that files every instance it receives.

Instances received over the network (``sortscp serve``) and files already on
disk (``sortscp sort``) are placed into the same folder layout, computed by
:func:`scp.layout.relative_path` from the header alone.
"""

__version__ = "0.1.0"

#: The layout of ``serve`` and ``sort`` unless ``--template`` says otherwise
#: (here, not in :mod:`scp.layout`, so the command line needs no pydicom to show it).
DEFAULT_TEMPLATE = (
    "{PatientName}_{PatientID}/{SeriesDescription}_{SeriesNumber}/{SOPInstanceUID}.dcm"
)

#: Implementation Class UID written into the File Meta of every stored file.
#: Derived once, deterministically, under pydicom's UID root:
#: ``generate_uid(entropy_srcs=["sortscp implementation class"])``.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.14081607801029542099735549568047814947"

#: Implementation Version Name (at most 16 characters).
IMPLEMENTATION_VERSION_NAME = f"SORTSCP_{__version__}"[:16]
