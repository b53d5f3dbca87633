"""The upstream's own addresses: which next links are followed, and where; which references
are the server's own (``base_url`` and ``also_known_as``)."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync_agent.own_address import followed
from sync_agent.pull_answers import localise
from sync_agent.pull_search import _where

BASE = "https://ehr.test/fhir/R4"
# HAPI behind a reverse proxy that does not pass the public host on writes its own address.
HAPI = "http://localhost:8080/fhir"


@pytest.mark.parametrize(
    "link",
    [
        f"{BASE}/Appointment?_offset=50",
        f"{BASE}?_getpages=c9b2&_getpagesoffset=20&_count=20&_bundletype=searchset",  # HAPI
        BASE,
    ],
)
def test_a_next_link_at_the_base_url_is_followed_as_it_is(link: str) -> None:
    assert followed(link, BASE) == link
    assert followed(link, BASE + "/") == link


@pytest.mark.parametrize(
    "link",
    [
        "https://other.test/fhir/R4/Appointment?_offset=50",  # another host
        "http://ehr.test/fhir/R4/Appointment?_offset=50",  # not as the client sends
        "https://ehr.test/fhir/R4b/Appointment?_offset=50",  # beside the base path
        "https://ehr.test/fhir/R4.evil.test/Appointment",
        "https://ehr.test.evil.test/fhir/R4/Appointment",
        f"{HAPI}?_getpages=c9b2",  # the server's other address, not configured
        "/fhir/R4/Appointment?_offset=50",
        "not a url",
    ],
)
def test_a_next_link_elsewhere_is_not_followed(link: str) -> None:
    assert followed(link, BASE) is None


@pytest.mark.parametrize(
    ("link", "asked"),
    [
        (f"{HAPI}?_getpages=c9b2&_getpagesoffset=20", f"{BASE}?_getpages=c9b2&_getpagesoffset=20"),
        (f"{HAPI}/Appointment?_offset=50", f"{BASE}/Appointment?_offset=50"),
        ("HTTP://LOCALHOST:8080/fhir/Patient?_id=1,2", f"{BASE}/Patient?_id=1,2"),
        # As the server encoded it: an escaped value is not decoded on the way.
        (f"{HAPI}/Patient?name=a%20b&x=%2F%26", f"{BASE}/Patient?name=a%20b&x=%2F%26"),
        (HAPI, BASE),
    ],
)
def test_a_next_link_at_an_also_known_as_address_is_asked_at_the_base_url(
    link: str, asked: str
) -> None:
    assert followed(link, BASE, [HAPI]) == asked
    assert followed(link, BASE, ["https://gateway.test/x", HAPI + "/"]) == asked


@pytest.mark.parametrize(
    "link",
    [
        "http://localhost:8081/fhir/Patient?_offset=50",  # another port
        "http://localhost:8080/fhirx/Patient?_offset=50",  # beside the alias's path
        "http://localhost/fhir/Patient?_offset=50",
    ],
)
def test_a_next_link_beside_an_also_known_as_address_is_not_followed(link: str) -> None:
    assert followed(link, BASE, [HAPI]) is None


def test_an_also_known_as_host_without_a_path_takes_any_path_on_it() -> None:
    alias = "http://fhir-backend.internal"
    link = "http://fhir-backend.internal/Appointment?_offset=50"
    assert followed(link, BASE, [alias]) == f"{BASE}/Appointment?_offset=50"


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=60),
        st.builds(
            lambda head, tail: head + tail,
            st.sampled_from(
                [BASE, HAPI, "http://localhost:8080", "https://ehr.test", "http://LOCALHOST:8080"]
            ),
            st.text(max_size=40),
        ),
    )
)
def test_a_followed_link_only_ever_goes_to_the_base_url(link: str) -> None:
    # The credentials go with the request: whatever a server writes as its next link, what
    # is asked is under the configured base URL, or nothing is asked.
    asked = followed(link, BASE, [HAPI])
    assert asked is None or asked == BASE or asked.startswith((BASE + "/", BASE + "?"))
    if asked is not None:
        # And as the client will send it: the base URL's scheme, host and port, no userinfo.
        try:
            url = httpx.URL(asked)
        except httpx.InvalidURL:
            return  # not sent at all (exchange() raises before a request is made)
        assert (url.scheme, url.host, url.port, url.userinfo) == ("https", "ehr.test", None, b"")


def test_references_at_an_also_known_as_address_are_the_servers_own() -> None:
    refs = [
        f"{HAPI}/Patient/7",
        "HTTP://localhost:8080/fhir/Location/9/_history/2",
        f"{BASE}/Patient/8",
        "http://localhost:8081/fhir/Patient/7",  # another port: another server
        "https://other.test/fhir/Patient/7",
        f"{HAPI}/Patient?name=x",  # a search, not a reference
    ]
    done = localise({"p": [{"reference": r} for r in refs]}, BASE, [HAPI])
    assert [p["reference"] for p in done["p"]] == [
        "Patient/7",
        "Location/9/_history/2",
        "Patient/8",
        *refs[3:],
    ]
    # Without the alias those are another server's, and stay as they are.
    alone = localise({"p": [{"reference": r} for r in refs]}, BASE)
    assert [p["reference"] for p in alone["p"]] == [refs[0], refs[1], "Patient/8", *refs[3:]]


@pytest.mark.parametrize(
    ("link", "said"),
    [
        (f"{HAPI}/R4/Appointment?_offset=2&actor=Location/1", f"{HAPI}/R4"),
        (f"{HAPI}?_getpages=c9b2", HAPI),
        ("http://localhost:8080/Patient?_id=p-7,p-8", "http://localhost:8080"),
        ("https://h.test/api/FHIR/R4/Patient/p-7/_history?_count=2", "https://h.test/api/FHIR/R4"),
        ("http://[::1]:8080/baseR4/Observation?subject=Patient/p-7", "http://[::1]:8080/baseR4"),
        ("not a url", "an address with no host"),
    ],
)
def test_a_link_not_followed_is_named_by_the_base_it_is_at_never_an_id(
    link: str, said: str
) -> None:
    # The journal line: what also_known_as takes (a path before the type counts), and never
    # a query or a path segment after the type, which may carry ids.
    assert _where(link) == said
    assert "p-7" not in _where(link)
