"""The DIMSE services, one decision each, shared by both ways an association runs
(:mod:`dimse.loop`, :mod:`dimse.toolkit`)."""
