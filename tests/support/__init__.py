"""Test helpers (imported as ``tests.support.<module>``), kept apart from conftest.py's fixtures."""
