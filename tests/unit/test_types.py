"""
The shared value types of :mod:`nattraverse._types`.
"""

from __future__ import annotations

import re

import pytest

from nattraverse._types import Endpoint


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("192.0.2.1:3478", Endpoint("192.0.2.1", 3478)),
        ("0.0.0.0:0", Endpoint("0.0.0.0", 0)),
        ("192.0.2.1:65535", Endpoint("192.0.2.1", 65535)),
        ("[2001:db8::1]:3478", Endpoint("2001:db8::1", 3478)),
        ("[::]:1", Endpoint("::", 1)),
        # the address is normalised to its compressed form
        ("[2001:0DB8:0:0:0:0:0:1]:80", Endpoint("2001:db8::1", 80)),
        ("192.0.2.1:03478", Endpoint("192.0.2.1", 3478)),
    ],
)
def test_parse(text: str, endpoint: Endpoint) -> None:
    """HOST:PORT and [IPV6]:PORT parse to an address and a port."""
    assert Endpoint.parse(text) == endpoint


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("192.0.2.1", Endpoint("192.0.2.1", 3478)),
        ("2001:db8::1", Endpoint("2001:db8::1", 3478)),
        ("[2001:db8::1]", Endpoint("2001:db8::1", 3478)),
        ("::1", Endpoint("::1", 3478)),
        ("192.0.2.1:80", Endpoint("192.0.2.1", 80)),
    ],
)
def test_parse_default_port(text: str, endpoint: Endpoint) -> None:
    """A bare address takes the default port; an explicit port wins."""
    assert Endpoint.parse(text, default_port=3478) == endpoint


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("192.0.2.1", "has no port; write it as HOST:PORT"),
        ("2001:db8::1", "has no port"),
        ("[2001:db8::1]", "has no port"),
        ("192.0.2.1:http", "has a port that is not a number"),
        ("192.0.2.1:-1", "has a port that is not a number"),
        ("192.0.2.1:", "has a port that is not a number"),
        ("[::1]:", "has a port that is not a number"),
        ("192.0.2.1:\u0663", "has a port that is not a number"),  # ARABIC-INDIC DIGIT THREE
        ("192.0.2.1:65536", "has a port outside 0-65535"),
        ("example.org:3478", "is not an IP address"),
        ("192.0.2.256:1", "is not an IP address"),
        ("[example.org]:1", "is not an IP address"),
        ("[::1]3478", "has '3478' after ']'"),
        ("[::1]x:3478", "has 'x:3478' after ']'"),
        (":3478", "is not an IP address"),
        ("", "has no port"),
    ],
)
def test_parse_error(text: str, reason: str) -> None:
    """A malformed endpoint raises ValueError quoting the text and saying what is wrong."""
    with pytest.raises(ValueError, match="^" + re.escape(f"{text!r} {reason}")):
        Endpoint.parse(text)


def test_parse_error_with_default_port() -> None:
    """A default port does not excuse a bad address."""
    with pytest.raises(ValueError, match="'nowhere' is not an IP address"):
        Endpoint.parse("nowhere", default_port=3478)


@pytest.mark.parametrize(
    ("endpoint", "text"),
    [
        (Endpoint("192.0.2.1", 3478), "192.0.2.1:3478"),
        (Endpoint("2001:db8::1", 3478), "[2001:db8::1]:3478"),
    ],
)
def test_str(endpoint: Endpoint, text: str) -> None:
    """str() writes HOST:PORT, with brackets around IPv6 addresses."""
    assert str(endpoint) == text


@pytest.mark.parametrize(
    "endpoint", [Endpoint("192.0.2.1", 3478), Endpoint("2001:db8::1", 0)], ids=str
)
def test_str_parses_back(endpoint: Endpoint) -> None:
    """Endpoint.parse reads back what str() writes."""
    assert Endpoint.parse(str(endpoint)) == endpoint


def test_is_a_tuple() -> None:
    """An Endpoint is the (host, port) tuple socket APIs take."""
    assert Endpoint("192.0.2.1", 3478) == ("192.0.2.1", 3478)
