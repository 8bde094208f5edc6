"""
The complete example of docs/testing.rst runs and prints what the page
says, and its variants fail the way the page says.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

PAGE = Path(__file__).resolve().parents[3] / "docs" / "testing.rst"


def _blocks() -> tuple[str, str]:
    """The example's code and its expected output."""
    text = PAGE.read_text()
    section = text.split("A complete example\n", 1)[1]
    blocks = re.findall(r"\.\. code-block:: (\w+)\n\n((?:    .*\n|\n)+)", section)
    (_, code), (_, output) = blocks[:2]

    def dedent(block: str) -> str:
        return "\n".join(line[4:] for line in block.splitlines()).strip() + "\n"

    return dedent(code), dedent(output)


def _run(code: str) -> tuple[str, dict[str, Any]]:
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(PAGE), "exec"), namespace)
    return out.getvalue(), namespace


def test_example_prints_what_the_page_says() -> None:
    """The example's output is the page's, run after run."""
    code, expected = _blocks()
    assert _run(code)[0] == expected
    assert _run(code)[0] == expected


def test_example_without_opening_packet() -> None:
    """Without Bob's first packet his NAT has no mapping and drops the pings."""
    code, _ = _blocks()
    code = code.replace('echo.write(b"let Alice in", alice_public)\n', "")
    code = code[: code.index("(mapping,)")]
    _, namespace = _run(code)
    assert namespace["pinger"].answers == []
    assert namespace["bob_nat"].stats.no_mapping == 4


def test_example_with_symmetric_nat() -> None:
    """Behind a symmetric NAT, Bob's first packet opens another port."""
    code, _ = _blocks()
    code = code.replace('preset="port-restricted"', 'preset="symmetric"')
    code = code[: code.index("print(")]
    _, namespace = _run(code)
    assert namespace["pinger"].answers == []
    (mapping,) = namespace["bob_nat"].mappings
    assert mapping.external.port != 5000


def test_stun_snippet_runs() -> None:
    """The page's STUN server and client snippet works as written."""
    text = PAGE.read_text()
    section = text.split("Any code written against", 1)[1]
    block = re.search(r"::\n\n((?:    .*\n|\n)+)", section)
    assert block is not None
    code = "\n".join(line[4:] for line in block.group(1).splitlines())
    setup = "from nattraverse.testing import Network\nnetwork = Network()\n"
    _, namespace = _run(setup + code)
    assert namespace["response"].mapped_address.host == "203.0.113.1"
