"""DIMSE front end: a pynetdicom Application Entity serving the gateway core."""
