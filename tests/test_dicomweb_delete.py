"""DELETE of studies, series and instances: admin only; rows and files removed together."""

from __future__ import annotations

import pytest
from requests.exceptions import HTTPError

from gateway.core import Gateway
from tests.support.common import LiveServer, stored_relpaths
from tests.support.dicomweb_helpers import api_key, client, load_corpus, raw


def files(gateway: Gateway) -> set[str]:
    return set(stored_relpaths(gateway))


def test_delete_instance_series_study(live: LiveServer) -> None:
    gateway = live.gateway
    c = load_corpus(gateway)
    admin = client(live.http_url, api_key(gateway, "ops", "admin"))
    before = files(gateway)
    assert len(before) == 9

    sop = c.instances(c.series_a_ct)[0]
    admin.delete_instance(c.study_a, c.series_a_ct, sop)
    assert gateway.index.find_instance(sop) is None
    assert len(files(gateway)) == 8
    found = admin.search_for_studies(search_filters={"StudyInstanceUID": c.study_a})
    assert found[0]["00201208"]["Value"] == [4]  # counts kept current

    admin.delete_series(c.study_a, c.series_a_mr)
    found = admin.search_for_studies(search_filters={"StudyInstanceUID": c.study_a})
    assert found[0]["00201206"]["Value"] == [1]
    assert found[0]["00080061"]["Value"] == ["CT"]  # ModalitiesInStudy updated
    assert len(files(gateway)) == 6

    admin.delete_study(c.study_b)
    assert admin.search_for_studies(search_filters={"PatientID": "P-002"}) == []
    assert len(files(gateway)) == 4
    with pytest.raises(HTTPError, match="404"):
        admin.retrieve_study(c.study_b)
    with pytest.raises(HTTPError, match="404"):
        admin.delete_study(c.study_b)
    # What is left is untouched and still served.
    assert len(admin.retrieve_study(c.study_c)) == 2


def test_delete_needs_admin(live: LiveServer) -> None:
    gateway = live.gateway
    c = load_corpus(gateway)
    writer = api_key(gateway, "writer", "dicomweb:read,dicomweb:write")
    reply = raw(f"{live.http_url}/dicomweb/studies/{c.study_a}", method="DELETE",
                headers={"Authorization": f"Bearer {writer}"})
    assert reply.status == 403
    assert reply.headers["Content-Type"] == "application/problem+json"
    assert raw(f"{live.http_url}/dicomweb/studies/{c.study_a}", method="DELETE").status == 401
    assert len(files(gateway)) == 9
    admin = api_key(gateway, "ops", "admin")
    reply = raw(f"{live.http_url}/dicomweb/studies/{c.study_a}", method="DELETE",
                headers={"Authorization": f"Bearer {admin}"})
    assert reply.status == 204 and reply.body == b""
    assert raw(f"{live.http_url}/dicomweb/studies/1.2.bad", method="DELETE",
               headers={"Authorization": f"Bearer {admin}"}).status == 400
