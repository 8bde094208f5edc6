"""
natcheck behind real kernel NATs: behind every preset of the lab (and cone
NATs with hairpinning on, or without port preservation),
``python -m nattraverse.natcheck --json`` against our ``twistd
natrendezvous`` with two addresses gives the right answer; and its mapping
and filtering agree with Debian's stun-client (against Debian's stund) and
with coturn's turnutils_natdiscovery (against coturn's turnserver with two
addresses) wherever those tools can tell.

Each client runs once per module in a lab of its own: one public host with
the server, one NAT per case side by side on the internet, one host behind
each, every client started at the same time (about 4 s for natcheck, most
of it the 3 s natcheck waits behind the NAT that blocks UDP; 2 s for
stun-client; 7 s for turnutils_natdiscovery, which waits 3 s for each
filtered answer).  The tests read those results, one behaviour each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from nattraverse.discovery import (
    Allocation,
    AllocationPattern,
    Filtering,
    Mapping,
    Rfc3489Type,
)
from tests.lab.natcheck_support import (
    ALTERNATE,
    CASES,
    PRIMARY,
    Case,
    Finished,
    NatDiscoveryVerdict,
    OnceInLab,
    StunClientType,
    StunClientVerdict,
    behind_each,
    natcheck_argv,
    natcheck_report,
    natdiscovery_argv,
    parse_natdiscovery,
    parse_stun_client,
    repo_environment,
    run_together,
    running,
    start_coturn,
    start_rendezvous,
    start_stund,
    stun_client_argv,
)
from tests.natlab import Filtering as LabFiltering
from tests.natlab import Lab
from tests.natlab import Mapping as LabMapping
from tests.natlab.ruleset import SEQUENTIAL_BASE

EIM = Mapping.ENDPOINT_INDEPENDENT
ADM = Mapping.ADDRESS_DEPENDENT
APDM = Mapping.ADDRESS_AND_PORT_DEPENDENT
EIF = Filtering.ENDPOINT_INDEPENDENT
ADF = Filtering.ADDRESS_DEPENDENT
APDF = Filtering.ADDRESS_AND_PORT_DEPENDENT
PRESERVED = Allocation(AllocationPattern.PRESERVED)

#: RFC 3489 names natcheck gives only when there is no NAT.
NO_NAT_NAMES = {Rfc3489Type.OPEN.value, Rfc3489Type.SYMMETRIC_UDP_FIREWALL.value}


@dataclass(frozen=True)
class Expected:
    """
    What natcheck must report behind one case.

    :ivar allocation: ``None`` where the pattern is not checked: without
        port preservation the lab's NAT XORs the (random) local port with a
        constant, which no pattern of consecutive mappings shows.
    """

    mapping: Mapping | None
    filtering: Filtering | None
    rfc3489: Rfc3489Type
    hairpin: bool | None
    port_preservation: bool | None
    allocation: Allocation | None
    udp: str = "ok"


#: Per case: no NAT (the two routers) hairpins trivially, a host reaching
#: its own address; symmetric NATs allocate a random or a +1 port.
EXPECTED: dict[str, Expected] = {
    "full-cone": Expected(EIM, EIF, Rfc3489Type.FULL_CONE, False, True, PRESERVED),
    "restricted-cone": Expected(EIM, ADF, Rfc3489Type.RESTRICTED_CONE, False, True, PRESERVED),
    "port-restricted": Expected(
        EIM, APDF, Rfc3489Type.PORT_RESTRICTED_CONE, False, True, PRESERVED
    ),
    "symmetric": Expected(
        APDM, APDF, Rfc3489Type.SYMMETRIC, False, False, Allocation(AllocationPattern.RANDOM)
    ),
    "symmetric-sequential": Expected(
        APDM,
        APDF,
        Rfc3489Type.SYMMETRIC,
        False,
        False,
        Allocation(AllocationPattern.SEQUENTIAL, 1),
    ),
    "udp-blocked": Expected(
        None, None, Rfc3489Type.BLOCKED, None, None, Allocation(), udp="blocked"
    ),
    "symmetric-udp-firewall": Expected(
        EIM, APDF, Rfc3489Type.SYMMETRIC_UDP_FIREWALL, True, True, PRESERVED
    ),
    "open": Expected(EIM, EIF, Rfc3489Type.OPEN, True, True, PRESERVED),
    "full-cone-hairpin": Expected(EIM, EIF, Rfc3489Type.FULL_CONE, True, True, PRESERVED),
    "port-restricted-hairpin": Expected(
        EIM, APDF, Rfc3489Type.PORT_RESTRICTED_CONE, True, True, PRESERVED
    ),
    "port-restricted-no-preservation": Expected(
        EIM, APDF, Rfc3489Type.PORT_RESTRICTED_CONE, False, False, None
    ),
}


# -- running the clients, once per module ---------------------------------------


@dataclass(frozen=True)
class NatcheckRun:
    """natcheck behind one case, and the address the internet sees its host at."""

    case: Case
    finished: Finished
    public_address: str

    @property
    def report(self) -> dict[str, Any]:
        return natcheck_report(self.finished)


def _run_natcheck(lab: Lab, directory: Path) -> dict[str, NatcheckRun]:
    server = lab.public_host("stun", [PRIMARY.host, ALTERNATE.host])
    behind = behind_each(lab)
    with running(start_rendezvous(server, directory)):
        finished = run_together(
            {b.case.name: (b.host, natcheck_argv(PRIMARY)) for b in behind},
            env=repo_environment(),
        )
    return {
        b.case.name: NatcheckRun(b.case, finished[b.case.name], b.host.public_address)
        for b in behind
    }


def _run_stun_client(lab: Lab, directory: Path, stun: str, stund: str) -> dict[str, Finished]:
    server = lab.public_host("stund", [PRIMARY.host, ALTERNATE.host])
    behind = behind_each(lab)
    with running(start_stund(server, stund, directory)):
        return run_together(
            {b.case.name: (b.host, stun_client_argv(stun, PRIMARY)) for b in behind}
        )


def _run_natdiscovery(
    lab: Lab, directory: Path, natdiscovery: str, turnserver: str
) -> dict[str, Finished]:
    server = lab.public_host("coturn", [PRIMARY.host, ALTERNATE.host])
    behind = behind_each(lab)
    with running(start_coturn(server, turnserver, directory)):
        return run_together(
            {
                b.case.name: (b.host, natdiscovery_argv(natdiscovery, b.host, PRIMARY))
                for b in behind
            }
        )


@pytest.fixture(scope="module")
def natcheck_once() -> OnceInLab[dict[str, NatcheckRun]]:
    """natcheck behind every case, run on first use."""
    return OnceInLab()


@pytest.fixture(scope="module")
def stun_client_once() -> OnceInLab[dict[str, Finished]]:
    """stun-client behind every case, run on first use."""
    return OnceInLab()


@pytest.fixture(scope="module")
def natdiscovery_once() -> OnceInLab[dict[str, Finished]]:
    """turnutils_natdiscovery behind every case, run on first use."""
    return OnceInLab()


@pytest.fixture
def natcheck_runs(
    require_lab: None,
    stale_labs_swept: None,
    natcheck_once: OnceInLab[dict[str, NatcheckRun]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, NatcheckRun]:
    """natcheck's run behind each case (``natcheck --json``, against ours), by case name."""
    return natcheck_once(lambda lab: _run_natcheck(lab, tmp_path_factory.mktemp("natcheck")))


@pytest.fixture
def stun_client_runs(
    require_lab: None,
    stale_labs_swept: None,
    require_program: Callable[[str], str],
    stun_client_once: OnceInLab[dict[str, Finished]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Finished]:
    """stun-client's run (``stun SERVER -v``) behind each case, against stund."""
    stun, stund = require_program("stun"), require_program("stund")
    return stun_client_once(
        lambda lab: _run_stun_client(lab, tmp_path_factory.mktemp("stund"), stun, stund)
    )


@pytest.fixture
def natdiscovery_runs(
    require_lab: None,
    stale_labs_swept: None,
    require_program: Callable[[str], str],
    natdiscovery_once: OnceInLab[dict[str, Finished]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Finished]:
    """turnutils_natdiscovery's run (``-m -f``) behind each case, against coturn."""
    turnserver = require_program("turnserver")
    natdiscovery = require_program("turnutils_natdiscovery")
    return natdiscovery_once(
        lambda lab: _run_natdiscovery(
            lab, tmp_path_factory.mktemp("coturn"), natdiscovery, turnserver
        )
    )


def _run(runs: dict[str, NatcheckRun], case: Case) -> tuple[NatcheckRun, dict[str, Any], str]:
    run = runs[case.name]
    return run, run.report, run.finished.describe()


# -- the expectations themselves ------------------------------------------------


def _in_natcheck_terms(case: Case) -> tuple[Mapping | None, Filtering | None]:
    """The preset's claims as natcheck words them: no translation and no
    filtering look endpoint-independent from inside."""
    mapping, filtering = case.preset.mapping, case.preset.filtering
    if mapping is None or filtering is None:
        return None, None
    return (
        EIM if mapping is LabMapping.NONE else Mapping[mapping.name],
        EIF if filtering is LabFiltering.NONE else Filtering[filtering.name],
    )


def test_expectations_follow_the_presets() -> None:
    """The table covers every case, with the mapping and filtering each preset claims."""
    assert set(EXPECTED) == {case.name for case in CASES}
    for case in CASES:
        expected = EXPECTED[case.name]
        claims = _in_natcheck_terms(case)
        assert (expected.mapping, expected.filtering) == claims, case
        assert (expected.udp == "blocked") is (claims == (None, None)), case


# -- natcheck's answers -----------------------------------------------------------


@pytest.mark.lab
@pytest.mark.parametrize("case", CASES, ids=str)
def test_mapping_and_filtering(natcheck_runs: dict[str, NatcheckRun], case: Case) -> None:
    """natcheck reports the case's UDP reachability, mapping, filtering and RFC 3489 name."""
    run, report, output = _run(natcheck_runs, case)
    expected = EXPECTED[case.name]
    assert run.finished.returncode == (0 if expected.udp == "ok" else 1), output
    found = (report["udp"], report["mapping"], report["filtering"], report["rfc3489"])
    assert found == (
        expected.udp,
        None if expected.mapping is None else expected.mapping.value,
        None if expected.filtering is None else expected.filtering.value,
        expected.rfc3489.value,
    ), output


@pytest.mark.lab
@pytest.mark.parametrize("case", CASES, ids=str)
def test_port_allocation(natcheck_runs: dict[str, NatcheckRun], case: Case) -> None:
    """natcheck reports port preservation and the allocation pattern of new mappings."""
    _, report, output = _run(natcheck_runs, case)
    expected = EXPECTED[case.name]
    assert report["port_preservation"] is expected.port_preservation, output
    if expected.allocation is not None:
        assert report["allocation"] == expected.allocation.to_json(), output


@pytest.mark.lab
@pytest.mark.parametrize("case", CASES, ids=str)
def test_external_address(natcheck_runs: dict[str, NatcheckRun], case: Case) -> None:
    """The external endpoints are at the NAT's WAN address (the host's own without NAT)."""
    run, report, output = _run(natcheck_runs, case)
    expected = EXPECTED[case.name]
    external = [_endpoint(text) for text in report["external"]]
    if expected.udp == "blocked":
        assert external == [], output
        return
    assert {host for host, _ in external} == {run.public_address}, output
    if expected.mapping is EIM:
        assert len(external) == 1, output
    else:
        # One endpoint per destination: primary, other address, other both, other port.
        assert len(external) == 4, output
    if case.preset.sequential:
        assert external[0][1] == SEQUENTIAL_BASE, output


@pytest.mark.lab
@pytest.mark.parametrize("case", CASES, ids=str)
def test_hairpin(natcheck_runs: dict[str, NatcheckRun], case: Case) -> None:
    """natcheck sees hairpinning exactly where the NAT does it (or there is no NAT)."""
    _, report, output = _run(natcheck_runs, case)
    assert report["hairpin"] is EXPECTED[case.name].hairpin, output


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# -- agreement with the classic tools -------------------------------------------


@dataclass(frozen=True)
class Says:
    """
    What a third-party tool's verdict says about natcheck's findings;
    ``None`` wherever the tool cannot tell.
    """

    udp: str | None = "ok"
    nat: bool | None = None
    mapping: frozenset[Mapping] | None = None
    filtering: frozenset[Filtering] | None = None
    hairpin: bool | None = None
    port_preservation: bool | None = None


#: stun-client's NAT types (RFC 3489 tests I, II, III and I to the changed
#: address): no NAT ("Open", "Firewall") is no translation, which natcheck
#: calls endpoint-independent mapping; "Firewall" only says that test II's
#: answer (other address and port) was filtered; "Dependent Mapping" says
#: nothing about filtering.
STUN_CLIENT_SAYS: dict[StunClientType, Says] = {
    StunClientType.OPEN: Says(nat=False, mapping=frozenset({EIM}), filtering=frozenset({EIF})),
    StunClientType.FIREWALL: Says(
        nat=False, mapping=frozenset({EIM}), filtering=frozenset({ADF, APDF})
    ),
    StunClientType.INDEPENDENT_FILTER: Says(
        nat=True, mapping=frozenset({EIM}), filtering=frozenset({EIF})
    ),
    StunClientType.ADDRESS_DEPENDENT_FILTER: Says(
        nat=True, mapping=frozenset({EIM}), filtering=frozenset({ADF})
    ),
    StunClientType.PORT_DEPENDENT_FILTER: Says(
        nat=True, mapping=frozenset({EIM}), filtering=frozenset({APDF})
    ),
    StunClientType.DEPENDENT_MAPPING: Says(nat=True, mapping=frozenset({ADM, APDM})),
    StunClientType.BLOCKED: Says(udp="blocked"),
}


def stun_client_says(verdict: StunClientVerdict) -> Says:
    """What *verdict* says, with its hairpin and port-preservation flags
    (meaningless when it got no answer)."""
    says = STUN_CLIENT_SAYS[verdict.kind]
    if verdict.kind is StunClientType.BLOCKED:
        return says
    return replace(says, hairpin=verdict.hairpin, port_preservation=verdict.port_preserved)


def natdiscovery_says(verdict: NatDiscoveryVerdict) -> Says:
    """What *verdict* says: no answer at all is UDP blocked."""
    if not verdict.answered:
        return Says(udp="blocked")
    return Says(
        nat=not verdict.no_nat,
        mapping=None if verdict.mapping is None else frozenset({Mapping(verdict.mapping)}),
        filtering=None if verdict.filtering is None else frozenset({Filtering(verdict.filtering)}),
    )


def disagreements(says: Says, report: dict[str, Any]) -> list[str]:
    """Where natcheck's *report* is not what the tool *says* (and it can tell)."""
    ok = report["udp"] == "ok"
    found: dict[str, object] = {
        "udp": report["udp"],
        "nat": report["rfc3489"] not in NO_NAT_NAMES if ok else None,
        "mapping": None if report["mapping"] is None else Mapping(report["mapping"]),
        "filtering": None if report["filtering"] is None else Filtering(report["filtering"]),
        "hairpin": report["hairpin"],
        "port_preservation": report["port_preservation"],
    }
    out = []
    for name, value in found.items():
        told = getattr(says, name)
        if told is None:
            continue
        if (value not in told) if isinstance(told, frozenset) else (value != told):
            out.append(f"{name}: natcheck {value}, the tool {told}")
    return out


@pytest.mark.lab
@pytest.mark.interop
@pytest.mark.parametrize("case", CASES, ids=str)
def test_stun_client_agrees(
    natcheck_runs: dict[str, NatcheckRun], stun_client_runs: dict[str, Finished], case: Case
) -> None:
    """natcheck agrees with stun-client against stund wherever stun-client can tell."""
    _, report, output = _run(natcheck_runs, case)
    finished = stun_client_runs[case.name]
    verdict = parse_stun_client(finished.stdout + finished.stderr)
    problems = disagreements(stun_client_says(verdict), report)
    assert not problems, f"{problems}\n{verdict}\n{finished.describe()}\n{output}"


@pytest.mark.lab
@pytest.mark.interop
@pytest.mark.parametrize("case", CASES, ids=str)
def test_natdiscovery_agrees(
    natcheck_runs: dict[str, NatcheckRun], natdiscovery_runs: dict[str, Finished], case: Case
) -> None:
    """natcheck agrees with turnutils_natdiscovery against coturn wherever it can tell."""
    _, report, output = _run(natcheck_runs, case)
    finished = natdiscovery_runs[case.name]
    verdict = parse_natdiscovery(finished.stdout + finished.stderr)
    if verdict.answered:
        # coturn has two addresses: once it answers, the tool can always tell.
        assert verdict.mapping is not None, finished.describe()
        assert verdict.filtering is not None, finished.describe()
    problems = disagreements(natdiscovery_says(verdict), report)
    assert not problems, f"{problems}\n{verdict}\n{finished.describe()}\n{output}"
