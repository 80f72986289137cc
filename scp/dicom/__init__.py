"""Raw DICOM bytes: the header reader, the completeness walk, File Meta encoding. No network, no file-system policy."""
