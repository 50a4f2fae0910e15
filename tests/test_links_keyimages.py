"""Key images from Key Object Selection documents' stored DICOM JSON (PS3.3 A.35.4, TID 2010)."""

from __future__ import annotations

from gateway.core import Gateway
from gateway.keyimages import key_images, referenced_instances
from tests.support.links_helpers import load, small_study


def _ref(uid: str) -> dict[str, object]:
    return {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]}}]}}


def test_references_from_evidence_and_nested_content() -> None:
    metadata = {
        "0040A375": {"vr": "SQ", "Value": [{"00081115": {"vr": "SQ", "Value": [
            {"0020000E": {"vr": "UI", "Value": ["1.2.3"]}, **_ref("1.2.3.1")}]}}]},
        "0040A730": {"vr": "SQ", "Value": [
            {"0040A040": {"vr": "CS", "Value": ["TEXT"]}, **_ref("9.9.9")},  # not an IMAGE item
            {"0040A040": {"vr": "CS", "Value": ["CONTAINER"]}, "0040A730": {"vr": "SQ", "Value": [
                {"0040A040": {"vr": "CS", "Value": ["IMAGE"]}, **_ref("1.2.3.2")}]}},
        ]},
    }
    assert sorted(referenced_instances(metadata)) == ["1.2.3.1", "1.2.3.2"]
    assert list(referenced_instances({})) == []


def test_key_images_of_stored_studies(gateway: Gateway) -> None:
    with_kos = small_study("P1", "A1")
    without = small_study("P2", "A2", seed=2, key_object=False)
    study, other = load(gateway, with_kos), load(gateway, without)
    kos = next(ds for ds in with_kos if ds.Modality == "KO")
    expected = [str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                for item in kos.ContentSequence if item.ValueType == "IMAGE"]
    with gateway.index.Session() as session:
        found = key_images(session, study)
        assert [k.sop_instance_uid for k in found] == expected
        assert all(k.series_instance_uid != kos.SeriesInstanceUID for k in found)
        assert key_images(session, other) == []
        assert key_images(session, "1.2.3.4.5") == []
