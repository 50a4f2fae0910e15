"""Associations pynetdicom runs: its event handlers, thin adapters over :mod:`dimse.services`,
and the workarounds for its timing."""
