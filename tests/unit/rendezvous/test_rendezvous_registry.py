"""
The rendezvous registry: pure soft state with ``now`` passed in.
"""

from __future__ import annotations

import sys

import pytest

from nattraverse.errors import LimitExceeded, NameTaken, PeerNotFound
from nattraverse.identity import PeerId
from nattraverse.rendezvous.registry import Introduction, PeerRecord, Registration, Registry

ALICE = PeerId(b"\x01" * 32)
BOB = PeerId(b"\x02" * 32)
CAROL = PeerId(b"\x03" * 32)
RECORD = PeerRecord("192.0.2.1", 40000, 8000, (("10.0.0.1", 8000),))
SESSION = b"s" * 16


def registry(**limits: float) -> Registry:
    """A registry with a 60 s TTL and the given limits."""
    return Registry(**limits)  # type: ignore[arg-type]


def test_register_and_find_by_name_and_peer_id() -> None:
    """A registration is found by its name, its peer id and the peer id's text."""
    table = registry()
    made = table.register("alice", ALICE, "192.0.2.1", RECORD, 100.0, contact="conn")
    assert table.find("alice", 101.0) is made
    assert table.find(ALICE, 101.0) is made
    assert table.find(str(ALICE), 101.0) is made
    assert (made.name, made.peer_id, made.record, made.expires) == ("alice", ALICE, RECORD, 160.0)


def test_unknown_peer_not_found() -> None:
    """An unknown name raises PeerNotFound naming it."""
    with pytest.raises(PeerNotFound, match="nobody"):
        registry().find("nobody", 0.0)


def test_registration_expires_after_ttl() -> None:
    """At now + ttl the registration is gone."""
    table = registry(ttl=30.0)
    table.register("alice", ALICE, "192.0.2.1", RECORD, 0.0)
    table.find("alice", 29.9)
    with pytest.raises(PeerNotFound):
        table.find("alice", 30.0)
    assert len(table) == 0


def test_refresh_extends_ttl() -> None:
    """A refresh renews the registration for another TTL from now."""
    table = registry(ttl=30.0)
    table.register("alice", ALICE, "192.0.2.1", RECORD, 0.0, contact="conn")
    assert table.refresh(ALICE, 20.0, contact="conn") == 50.0
    assert table.find("alice", 45.0).peer_id == ALICE


def test_refresh_unknown_fails() -> None:
    """Refreshing without a live registration raises PeerNotFound."""
    table = registry(ttl=30.0)
    table.register("alice", ALICE, "192.0.2.1", RECORD, 0.0)
    with pytest.raises(PeerNotFound, match="Register again"):
        table.refresh(ALICE, 31.0)
    with pytest.raises(PeerNotFound):
        table.refresh(BOB, 1.0)


def test_refresh_from_other_connection_fails() -> None:
    """Only the connection that registered may refresh."""
    table = registry()
    table.register("alice", ALICE, "192.0.2.1", RECORD, 0.0, contact="new")
    with pytest.raises(PeerNotFound):
        table.refresh(ALICE, 1.0, contact="old")


def test_name_taken_by_other_key() -> None:
    """A live name cannot be registered under another peer id."""
    table = registry()
    table.register("alice", ALICE, "192.0.2.1", RECORD, 0.0)
    with pytest.raises(NameTaken, match="alice"):
        table.register("alice", BOB, "192.0.2.2", RECORD, 1.0)
    assert table.find("alice", 1.0).peer_id == ALICE


def test_name_free_after_expiry() -> None:
    """Once the holder's registration expired, another key can take the name."""
    table = registry(ttl=10.0)
    table.register("alice", ALICE, "192.0.2.1", RECORD, 0.0)
    assert table.register("alice", BOB, "192.0.2.2", RECORD, 10.0).peer_id == BOB


def test_restart_replaces_old_registration() -> None:
    """The same peer id registering again replaces its registration and frees the old name."""
    table = registry()
    table.register("alice", ALICE, "192.0.2.1", RECORD, 0.0, contact="old")
    made = table.register("alice2", ALICE, "192.0.2.9", RECORD, 5.0, contact="new")
    assert len(table) == 1
    assert table.find(ALICE, 6.0) is made
    with pytest.raises(PeerNotFound):
        table.find("alice", 6.0)
    assert table.count_from("192.0.2.1") == 0
    assert table.count_from("192.0.2.9") == 1


def test_total_cap() -> None:
    """Registrations beyond the total cap raise LimitExceeded."""
    table = registry(max_registrations=2)
    table.register("a", ALICE, "192.0.2.1", RECORD, 0.0)
    table.register("b", BOB, "192.0.2.2", RECORD, 0.0)
    with pytest.raises(LimitExceeded, match="2 registrations"):
        table.register("c", CAROL, "192.0.2.3", RECORD, 0.0)


def test_per_ip_cap() -> None:
    """Registrations beyond the cap for one source address raise LimitExceeded."""
    table = registry(max_per_ip=1)
    table.register("a", ALICE, "192.0.2.1", RECORD, 0.0)
    with pytest.raises(LimitExceeded, match=r"192\.0\.2\.1"):
        table.register("b", BOB, "192.0.2.1", RECORD, 0.0)
    table.register("b", BOB, "192.0.2.2", RECORD, 0.0)


def test_replacing_does_not_count_against_caps() -> None:
    """A restart at the cap replaces instead of being refused."""
    table = registry(max_registrations=1, max_per_ip=1)
    table.register("a", ALICE, "192.0.2.1", RECORD, 0.0)
    table.register("a", ALICE, "192.0.2.1", RECORD, 1.0)
    assert len(table) == 1


def test_expired_registrations_free_caps() -> None:
    """Expired registrations do not count against the caps."""
    table = registry(ttl=10.0, max_registrations=1)
    table.register("a", ALICE, "192.0.2.1", RECORD, 0.0)
    table.register("b", BOB, "192.0.2.1", RECORD, 10.0)
    assert len(table) == 1


def test_detach_keeps_name_but_not_connected() -> None:
    """A detached registration keeps its name reserved but cannot be introduced."""
    table = registry()
    table.register("alice", ALICE, "192.0.2.1", RECORD, 0.0, contact="conn")
    assert table.detach(ALICE, "conn")
    assert table.find("alice", 1.0).contact is None
    with pytest.raises(PeerNotFound, match="registered but not connected"):
        table.find_connected("alice", 1.0)
    with pytest.raises(NameTaken):
        table.register("alice", BOB, "192.0.2.2", RECORD, 1.0)


def test_detach_of_old_connection_ignored() -> None:
    """Losing a connection that no longer holds the registration changes nothing."""
    table = registry()
    table.register("alice", ALICE, "192.0.2.1", RECORD, 0.0, contact="new")
    assert not table.detach(ALICE, "old")
    assert table.find_connected("alice", 1.0).contact == "new"


def test_unregister() -> None:
    """unregister drops a registration at once."""
    table = registry()
    table.register("alice", ALICE, "192.0.2.1", RECORD, 0.0)
    assert table.unregister(ALICE)
    assert not table.unregister(ALICE)
    assert len(table) == 0


def test_expire_sweeps_only_due_entries() -> None:
    """expire drops what is due, in refresh order, and keeps the rest."""
    table = registry(ttl=10.0, introduction_ttl=5.0)
    table.register("a", ALICE, "192.0.2.1", RECORD, 0.0, contact="a")
    table.register("b", BOB, "192.0.2.1", RECORD, 1.0)
    table.refresh(ALICE, 4.0, contact="a")
    table.introduce(SESSION, ALICE, BOB, "192.0.2.1", 40000, 0.0)
    assert table.expire(11.0) == (1, 1)
    assert table.find("a", 11.0).peer_id == ALICE
    assert table.introductions == 0
    assert table.count_from("192.0.2.1") == 1


def test_introduction_recorded_and_expires() -> None:
    """An introduction is found by session id until its TTL runs out."""
    table = registry(introduction_ttl=5.0)
    made = table.introduce(
        SESSION, ALICE, BOB, "192.0.2.1", 40000, 0.0, caller_contact="a", callee_contact="b"
    )
    found = table.introduction(SESSION, 4.0)
    assert found is made
    assert isinstance(found, Introduction)
    assert (found.caller, found.callee, found.caller_host, found.caller_port) == (
        ALICE,
        BOB,
        "192.0.2.1",
        40000,
    )
    assert (found.caller_contact, found.callee_contact, found.reversals) == ("a", "b", 0)
    assert table.introduction(SESSION, 5.0) is None


def test_introduction_cap() -> None:
    """Introductions beyond the cap raise LimitExceeded, until some expire."""
    table = registry(max_introductions=1, introduction_ttl=5.0)
    table.introduce(b"1" * 16, ALICE, BOB, "192.0.2.1", 1, 0.0)
    with pytest.raises(LimitExceeded, match="introductions"):
        table.introduce(b"2" * 16, ALICE, BOB, "192.0.2.1", 1, 1.0)
    table.introduce(b"2" * 16, ALICE, BOB, "192.0.2.1", 1, 5.0)


def test_introduction_forget() -> None:
    """forget_introduction drops a session."""
    table = registry()
    table.introduce(SESSION, ALICE, BOB, "192.0.2.1", 1, 0.0)
    assert table.forget_introduction(SESSION)
    assert table.introduction(SESSION, 0.0) is None
    assert not table.forget_introduction(SESSION)


def test_duplicate_session_refused() -> None:
    """A session id in use cannot be recorded twice."""
    table = registry()
    table.introduce(SESSION, ALICE, BOB, "192.0.2.1", 1, 0.0)
    with pytest.raises(ValueError, match="in use"):
        table.introduce(SESSION, ALICE, BOB, "192.0.2.1", 1, 0.0)


@pytest.mark.parametrize(
    "limits",
    [{"ttl": 0.0}, {"introduction_ttl": -1.0}, {"max_registrations": 0}, {"max_per_ip": 0}],
)
def test_bad_limits_refused(limits: dict[str, float]) -> None:
    """Limits must be positive."""
    with pytest.raises(ValueError, match=next(iter(limits))):
        registry(**limits)


def test_entries_are_small() -> None:
    """Registrations and introductions have no per-instance dict."""
    made = registry().register("alice", ALICE, "192.0.2.1", RECORD, 0.0)
    assert isinstance(made, Registration)
    assert not hasattr(made, "__dict__")
    assert sys.getsizeof(made) <= 96
    assert not hasattr(Introduction(SESSION, ALICE, BOB, "h", 1, 0.0), "__dict__")
