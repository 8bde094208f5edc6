"""
The NAT lab: network namespaces, real kernel NATs made with nftables, and
impaired wires, for the ``lab`` tests (root only; standard library only).

Building a topology
-------------------

::

    from tests.natlab import Lab, Preset, Reflector, classify

    with Lab() as lab:                              # prefix e.g. "ntl3fa9"
        internet = lab.internet()                   # a bridge namespace
        stun = lab.public_host("stun", ["192.0.2.10", "192.0.2.11"])
        cgn = lab.nat("cgn", Preset.PORT_RESTRICTED, lan="100.64.0.0/24")
        home = lab.nat("home", "full-cone", wan=cgn, hairpin=True, delay_ms=10)
        a = lab.host("a", behind=home)              # 10.1.0.10, default via home
        observed = classify(a, Reflector(stun))     # EIM/APDF: the CGN filters
    # every namespace with the prefix is gone here, whatever happened inside

Nodes are declared first and built together on first use (``run``,
``popen``, ``socket``...) or by :meth:`Lab.build`: one ``ip -batch`` in
the root namespace creates the namespaces and the veth pairs directly
inside them, then every namespace is configured at once from a thread
that has entered it.  More nodes may be declared afterwards; the next use
builds them.

:class:`Lab`
    ``Lab(prefix=None)``, a context manager.  ``internet()``;
    ``public_host(name, addresses=None, *, delay_ms=0, loss=0,
    delay_only_to=())`` (with *delay_only_to*, IPv4 addresses such as a
    NAT's WAN address, the delay applies only to what the host sends to
    them; loss still to everything);
    ``nat(name, preset="port-restricted", *, wan=None, wan_address=None,
    lan=None, hairpin=False, port_preservation=True, inbound="drop",
    mapping_timeout=None, delay_ms=0, loss=0)``;
    ``host(name, behind, *, address=None, delay_ms=0, loss=0)``;
    ``build()``; ``close()``; ``nodes`` (by name); ``namespaces`` (those
    that exist now); ``prefix``; ``build_seconds``;
    ``impairment_method()`` (``"netem"`` or ``"wire"``).
:class:`PublicHost`, :class:`Nat`, :class:`Host`, :class:`Internet`
    ``name``, ``namespace``, ``address`` (the first address; a NAT's WAN
    address), ``public_address`` (what the internet sees), ``delay_ms``
    and ``loss`` of the node's uplink, ``delay_only_to``,
    ``delay_to_internet_ms``;
    ``run(argv, timeout=30)`` and ``popen(argv)`` via ``ip netns exec``
    (processes still running are stopped when the lab closes);
    ``udp_socket(port=0, address="0.0.0.0")``, ``tcp_socket()``,
    ``socket(kind)``: sockets created inside the namespace, usable from
    the test process like any other, closed with the lab; ``call(fn)``
    runs a function in a thread inside the namespace.  A :class:`Nat` also
    has ``preset``, ``wan_address``, ``lan_address``, ``lan_network`` and
    ``rules`` (:class:`~tests.natlab.ruleset.RouterRules`); a
    :class:`PublicHost` ``addresses``; a :class:`Host` ``behind``.
:class:`Preset`
    A ``StrEnum`` of the NATs the lab builds, each with the RFC 4787
    ``mapping`` and ``filtering`` it claims (:class:`Mapping`,
    :class:`Filtering`): ``full-cone`` (EIM/EIF), ``restricted-cone``
    (EIM/ADF), ``port-restricted`` (EIM/APDF), ``symmetric`` (APDM/APDF,
    random ports), ``symmetric-sequential`` (APDM/APDF, ports +1 per new
    mapping), ``udp-blocked`` (no UDP), ``symmetric-udp-firewall`` (no
    translation, APDF) and ``open`` (no translation, no filtering).  The
    rulesets are in :mod:`tests.natlab.ruleset`.
Probing (:mod:`tests.natlab.probe`)
    :class:`Reflector` (four sockets of a public host with two addresses),
    :func:`classify` (mapping and filtering as seen from a host), and the
    helpers ``seen_from``, ``arrivals``, ``expect_nothing``,
    ``round_trips``.
Cleanup
    :meth:`Lab.close` stops the lab's processes and delayers, kills what
    else runs in its namespaces (the processes ``ip netns pids`` would
    list), closes its sockets and deletes every namespace with its
    prefix.  It runs when the ``with`` block ends (exception and
    ``KeyboardInterrupt`` included), at interpreter exit, and on SIGTERM
    (which raises ``KeyboardInterrupt`` in the main thread while a lab is
    open, after calling the handler it wraps: a Twisted reactor's, under
    pytest-twisted, is wrapped again whenever a lab builds).  After
    SIGKILL, :func:`sweep_stale_labs` (also ``python -m tests.natlab``)
    removes namespaces whose recorded owner process is dead and which are
    older than a limit.

Addresses: the internet carries documentation prefixes only (servers from
192.0.2.10, routers' WAN sides from 203.0.113.1, firewalls' and open
routers' routed /28s from 198.51.100.16); NAT LANs are private (``10.N.0.0/24``
by default, any RFC 1918 or RFC 6598 prefix with ``lan=``).

Delay and loss: per-link, one way (each direction gets *delay_ms*, so a
round trip over one delayed link takes 2 x *delay_ms*).  ``tc netem``
where the kernel has it; otherwise a wire namespace per impaired link (a
two-port bridge, br_netfilter on only there, nftables ``numgen`` for loss,
iptables ``NFQUEUE`` to the delayer of :mod:`tests.natlab.nfqueue`; needs
the Debian package ``iptables``: this kernel's nftables has no ``queue``).
Links without delay or loss have no wire.

Modules: :mod:`~tests.natlab.lab` (:class:`Lab`), :mod:`~tests.natlab.nodes`
(the node classes), :mod:`~tests.natlab.presets`, :mod:`~tests.natlab.ruleset`
(nftables text, pure), :mod:`~tests.natlab.probe`, :mod:`~tests.natlab.sweep`,
:mod:`~tests.natlab.nfqueue` (the delayer); private: ``_netns`` (namespace
primitives, owner mark), ``_plan`` (build steps), ``_segments``
(addressing), ``_impair`` (netem or wire), ``_registry`` (exit and SIGTERM).
"""

from tests.natlab.errors import LabError, LabUnavailable
from tests.natlab.lab import Host, Internet, Lab, Nat, Node, PublicHost
from tests.natlab.presets import Filtering, Inbound, Mapping, Preset
from tests.natlab.probe import Observation, Reflector, classify
from tests.natlab.sweep import sweep_stale_labs

__all__ = [
    "Filtering",
    "Host",
    "Inbound",
    "Internet",
    "Lab",
    "LabError",
    "LabUnavailable",
    "Mapping",
    "Nat",
    "Node",
    "Observation",
    "Preset",
    "PublicHost",
    "Reflector",
    "classify",
    "sweep_stale_labs",
]
