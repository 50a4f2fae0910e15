"""Synthetic DICOM studies for tests, benchmarks and the demo, plus small committed files.

``generate_study`` builds one study from a :class:`StudySpec`; ``generate_corpus`` yields many
small ones; ``files/`` holds one small file per transfer syntax (see ``files/MANIFEST.json``).
"""

from pathlib import Path

from sample_dicom.generator import (
                                    SeriesSpec,
                                    StudySpec,
                                    demo_study,
                                    deterministic_uid,
                                    generate_corpus,
                                    generate_study,
                                    key_object,
                                    write_datasets,
                                    write_demo_study,
                                    write_study,
)

FILES_DIR = Path(__file__).parent / "files"

__all__ = ["FILES_DIR", "SeriesSpec", "StudySpec", "demo_study", "deterministic_uid",
           "generate_corpus", "generate_study", "key_object", "write_datasets", "write_demo_study",
           "write_study"]
