"""Everything that faces the network; the only importer of pynetdicom."""
