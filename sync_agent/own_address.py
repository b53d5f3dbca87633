"""The upstream's own addresses: its base URL, and those it writes for itself.

A FHIR server writes its own address into what it answers: absolute references to its own
resources (FHIR R4 References, "Literal references": at the server's base, an absolute URL
*is* the relative reference) and the ``next`` links of search pages. Behind a gateway or a
reverse proxy that does not pass the public host on, it writes an address the box cannot
reach (Azure's FHIR service behind API Management writes its own host; HAPI behind a proxy,
``http://localhost:8080/fhir``). Those are configured as ``also_known_as``
(docs/site-config.md): references there are the server's own, and a ``next`` link there is
followed at ``base_url``. Nothing is ever sent to such an address: the box's credentials go
with each request, to ``base_url`` alone.

Pure functions of strings; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

import httpx

Origin = tuple[str, int | None, str]


def origin(url: httpx.URL) -> Origin:
    """(host, port, path) of a URL: the host in lower case, a scheme's default port as
    none, the path without a trailing slash; ``http`` and ``https`` alike (a server may
    write its own address with either behind a TLS-ending gateway)."""
    port = url.port
    if (url.scheme, port) in (("http", 80), ("https", 443)):
        port = None
    return url.host.lower(), port, url.path.rstrip("/")


def origins(base_url: str, also: Iterable[str] = ()) -> tuple[Origin, ...]:
    """The origins of ``base_url`` and of each address in ``also`` (one that is not a URL
    is left out: the site config checks them, so only a caller's mistake gets here)."""
    found = []
    for address in (base_url, *also):
        try:
            url = httpx.URL(address)
        except (httpx.InvalidURL, TypeError):
            continue
        if url.scheme in ("http", "https") and url.host:
            found.append(origin(url))
    return tuple(found)


def own_reference(reference: str, bases: tuple[Origin, ...]) -> str | None:
    """``<Type>/<id>[/_history/<v>]`` of an absolute reference at one of ``bases``, else None.

    Only that shape counts: a search URL, an operation or a reference with a query or a
    fragment is not a reference to one resource, and stays as it is.
    """
    try:
        url = httpx.URL(reference)
    except httpx.InvalidURL:
        return None
    if url.scheme not in ("http", "https") or not url.host or url.query or url.fragment:
        return None
    host, port, path = origin(url)
    for base_host, base_port, base_path in bases:
        if (host, port) == (base_host, base_port) and path.startswith(base_path + "/"):
            tail = path[len(base_path) + 1 :]
            parts = tail.split("/")
            shaped = len(parts) == 2 or (len(parts) == 4 and parts[2] == "_history")
            if shaped and parts[0].isalpha() and parts[0][:1].isupper() and all(parts):
                return tail
            return None
    return None


def followed(link: str, base_url: str, also: Iterable[str] = ()) -> str | None:
    """The URL to ask for one of the server's ``next`` links, or None when it is not the
    server's own (never followed: our credentials would go with it).

    At ``base_url`` itself (``<base>/Patient?…``, or ``<base>?_getpages=…`` as HAPI writes
    its paging links) the link is asked as it is. At an address in ``also`` the same path
    and query are asked under ``base_url``. ``base_url`` is matched exactly as configured
    (scheme and host as the client sends them); ``also`` as :func:`origin` spells it.
    """
    base = base_url.rstrip("/")
    if link == base or link.startswith((base + "/", base + "?")):
        return link
    try:
        url = httpx.URL(link)
    except httpx.InvalidURL:
        return None
    if url.scheme not in ("http", "https") or not url.host:
        return None
    raw = url.raw_path.decode("ascii")  # path and query, as the server encoded them
    for address in also:
        try:
            alias = httpx.URL(address)
        except (httpx.InvalidURL, TypeError):
            continue
        if origin(alias)[:2] != origin(url)[:2]:
            continue
        prefix = alias.raw_path.decode("ascii").split("?", 1)[0].rstrip("/")
        rest = raw[len(prefix) :]
        if raw.startswith(prefix) and (not rest or rest[0] in "/?"):
            return base + rest
    return None
