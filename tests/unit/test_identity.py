"""
Peer identities of :mod:`nattraverse.identity`: peer ids, key proofs,
certificates and the identity file.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from nattraverse.errors import (
    IdentityError,
    IdentityFileInsecure,
    IdentityFileInvalid,
    NatTraverseError,
    PeerAuthenticationFailed,
)
from nattraverse.identity import (
    CERTIFICATE_LIFETIME,
    PEER_ID_PREFIX,
    PROOF_CONTEXT,
    SIGNATURE_SIZE,
    Identity,
    PeerId,
    load_or_create,
    peer_id_of_certificate,
    verify,
)

#: 2026-01-01T00:00:00Z, the clock of every test that needs one.
NOW = 1767225600.0
YEAR = 365.25 * 86400
CHALLENGE = bytes(range(32))

#: SHA-256 of the empty string, a known digest with a known text form.
EMPTY_SHA256 = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
EMPTY_SHA256_ID = "nt1" + "4oymiquy7qobjgx36tejs35zeqt24qpemsnzgtfeswmrw6csxbkq"


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.generate(now=NOW)


@pytest.fixture(scope="module")
def other() -> Identity:
    return Identity.generate(now=NOW)


# -- PeerId ---------------------------------------------------------------


def test_peer_id_text_vector() -> None:
    """A digest has the documented text form: nt1 and lowercase base32."""
    assert str(PeerId(EMPTY_SHA256)) == EMPTY_SHA256_ID
    assert PeerId.parse(EMPTY_SHA256_ID) == PeerId(EMPTY_SHA256)


def test_peer_id_shape(identity: Identity) -> None:
    """A peer id is 55 characters: a DNS label and a certificate common name fit it."""
    text = str(identity.peer_id)
    assert text.startswith(PEER_ID_PREFIX)
    assert len(text) == 55
    assert re.fullmatch(r"[a-z2-7]+", text[3:])


def test_peer_id_is_hash_of_spki(identity: Identity) -> None:
    """The peer id hashes the DER SubjectPublicKeyInfo of the public key."""
    assert identity.peer_id.digest == hashlib.sha256(identity.public_key_der).digest()


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "does not start with 'nt1'"),
        ("4oymiquy7qobjgx36tejs35zeqt24qpemsnzgtfeswmrw6csxbkq", "does not start with 'nt1'"),
        ("NT1" + EMPTY_SHA256_ID[3:], "does not start with 'nt1'"),
        (EMPTY_SHA256_ID[:-1], "51 characters after 'nt1', not 52"),
        (EMPTY_SHA256_ID + "a", "53 characters after 'nt1', not 52"),
        (EMPTY_SHA256_ID + "=", "53 characters after 'nt1', not 52"),
        (" " + EMPTY_SHA256_ID, "does not start with 'nt1'"),
        (EMPTY_SHA256_ID[:-1] + "\n", "only lowercase letters and the digits 2-7"),
        ("nt1" + EMPTY_SHA256_ID[3:].upper(), "only lowercase letters and the digits 2-7"),
        (EMPTY_SHA256_ID[:10] + "1" + EMPTY_SHA256_ID[11:], "only lowercase letters"),
        (EMPTY_SHA256_ID[:10] + "8" + EMPTY_SHA256_ID[11:], "only lowercase letters"),
        # the last character carries one bit of the hash and four zero bits
        (EMPTY_SHA256_ID[:-1] + "r", "its last character is not one a peer id can end with"),
    ],
)
def test_peer_id_parse_rejects(text: str, complaint: str) -> None:
    """Text that is not a canonical peer id is refused, saying why."""
    with pytest.raises(ValueError, match="is not a peer id") as info:
        PeerId.parse(text)
    assert complaint in str(info.value)


def test_peer_id_parse_shortens_long_text() -> None:
    """A huge input is not copied whole into the error message."""
    with pytest.raises(ValueError, match=r"\.\.\. is not a peer id") as info:
        PeerId.parse("x" * 100_000)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("digest", [b"", b"\x00" * 31, b"\x00" * 33])
def test_peer_id_digest_size(digest: bytes) -> None:
    """A PeerId holds exactly a 32-byte digest."""
    with pytest.raises(ValueError, match="32 bytes"):
        PeerId(digest)


@given(st.binary(min_size=32, max_size=32))
def test_peer_id_round_trip(digest: bytes) -> None:
    """Every digest survives str() and parse()."""
    peer_id = PeerId(digest)
    assert PeerId.parse(str(peer_id)) == peer_id


@given(st.text(alphabet="nt1abcdefghijklmnopqrstuvwxyz234567AQ=", max_size=60))
def test_peer_id_parse_is_canonical(text: str) -> None:
    """Text either fails to parse or is the one text of the id it parses to."""
    try:
        peer_id = PeerId.parse(text)
    except ValueError:
        return
    assert str(peer_id) == text


@given(st.binary(min_size=32, max_size=32), st.sampled_from("abcdefghijklmnopqrstuvwxyz234567"))
def test_peer_id_last_character(digest: bytes, last: str) -> None:
    """Only the two last characters whose unused bits are zero (a, q) parse."""
    text = str(PeerId(digest))[:-1] + last
    if last in "aq":
        assert str(PeerId.parse(text)) == text
    else:
        with pytest.raises(ValueError, match="last character"):
            PeerId.parse(text)


def test_peer_id_repr_round_trips(identity: Identity) -> None:
    """repr() shows the text form."""
    assert repr(identity.peer_id) == f"PeerId.parse({str(identity.peer_id)!r})"


def test_peer_id_matches(identity: Identity, other: Identity) -> None:
    """matches() accepts the peer's key and certificate, and nobody else's."""
    peer_id = identity.peer_id
    assert peer_id.matches(identity.public_key)
    assert peer_id.matches(identity.certificate)
    assert not peer_id.matches(other.public_key)
    assert not peer_id.matches(other.certificate)


def test_peer_id_of_other_key_types() -> None:
    """Any key has a peer id; only matches() of the same key succeed."""
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    assert PeerId.of(key).matches(key)


# -- certificates ----------------------------------------------------------


def test_certificate_is_self_signed(identity: Identity) -> None:
    """The certificate is signed by its own key, and is no CA."""
    certificate = identity.certificate
    certificate.verify_directly_issued_by(certificate)
    assert certificate.issuer == certificate.subject
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca


def test_certificate_names_peer_id(identity: Identity) -> None:
    """The subject common name is the peer id of the certificate's key."""
    names = identity.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [n.value for n in names] == [str(identity.peer_id)]
    assert peer_id_of_certificate(identity.certificate) == identity.peer_id


def test_certificate_validity(identity: Identity) -> None:
    """Valid from an hour before now for the certificate lifetime."""
    certificate = identity.certificate
    assert certificate.not_valid_before_utc.timestamp() == NOW - 3600
    assert certificate.not_valid_after_utc.timestamp() == NOW + CERTIFICATE_LIFETIME
    assert CERTIFICATE_LIFETIME > 9.9 * YEAR


def test_encodings(identity: Identity) -> None:
    """The PEM and DER forms load back to the same certificate and key."""
    assert x509.load_pem_x509_certificate(identity.certificate_pem) == identity.certificate
    assert x509.load_der_x509_certificate(identity.certificate_der) == identity.certificate
    key = serialization.load_pem_private_key(identity.private_key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert identity.peer_id.matches(key.public_key())
    assert identity.private_key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")


def test_repr_hides_key(identity: Identity) -> None:
    """repr() shows the peer id and nothing secret."""
    assert repr(identity) == f"<Identity {identity.peer_id}>"


def test_identity_refuses_foreign_certificate(identity: Identity, other: Identity) -> None:
    """A certificate for another key cannot be paired with this key."""
    with pytest.raises(ValueError, match="not for the key"):
        Identity(identity.private_key, other.certificate)


def test_identity_refuses_other_curve() -> None:
    """Only P-256 keys make identities."""
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="not P-256"):
        Identity(key, Identity.generate(now=NOW).certificate)


def test_new_certificate_keeps_peer_id(identity: Identity) -> None:
    """A new certificate keeps the key, hence the peer id."""
    renewed = identity.with_new_certificate(now=NOW + YEAR)
    assert renewed.peer_id == identity.peer_id
    assert renewed.certificate.not_valid_before_utc.timestamp() == NOW + YEAR - 3600


# -- proof of possession ---------------------------------------------------


def test_sign_verify(identity: Identity) -> None:
    """A signature verifies with the key, and tells whose it is."""
    signature = identity.sign(CHALLENGE)
    assert len(signature) == SIGNATURE_SIZE
    assert verify(identity.public_key, CHALLENGE, signature) == identity.peer_id
    assert verify(identity.certificate, CHALLENGE, signature) == identity.peer_id
    assert verify(identity.public_key_der, CHALLENGE, signature) == identity.peer_id
    assert verify(identity.public_key_der, CHALLENGE, signature, peer_id=identity.peer_id)


def test_signature_covers_context(identity: Identity) -> None:
    """The signature is over PROOF_CONTEXT + challenge, never the bare challenge."""
    signature = identity.sign(CHALLENGE)
    with pytest.raises(PeerAuthenticationFailed):
        verify(identity.public_key, PROOF_CONTEXT + CHALLENGE, signature)
    shifted = identity.sign(CHALLENGE[:1])
    with pytest.raises(PeerAuthenticationFailed):
        verify(identity.public_key, CHALLENGE[:0], shifted)


def test_verify_wrong_key(identity: Identity, other: Identity) -> None:
    """Another peer's key does not verify the signature."""
    with pytest.raises(PeerAuthenticationFailed, match="does not match") as info:
        verify(other.public_key, CHALLENGE, identity.sign(CHALLENGE))
    assert info.value.peer_id == other.peer_id


def test_verify_wrong_challenge(identity: Identity) -> None:
    """A signature over one challenge does not answer another."""
    with pytest.raises(PeerAuthenticationFailed, match="does not match"):
        verify(identity.public_key, CHALLENGE[::-1], identity.sign(CHALLENGE))


@pytest.mark.parametrize("size", [0, 1, 63, 65, 72])
def test_verify_wrong_size(identity: Identity, size: int) -> None:
    """A signature of the wrong size (truncated, padded, DER) is refused."""
    signature = (identity.sign(CHALLENGE) * 2)[:size]
    with pytest.raises(PeerAuthenticationFailed, match=f"is {size} bytes, not 64"):
        verify(identity.public_key, CHALLENGE, signature)


@pytest.mark.parametrize("signature", [bytes(64), b"\xff" * 64])
def test_verify_out_of_range(identity: Identity, signature: bytes) -> None:
    """Zero and out-of-range r and s are refused."""
    with pytest.raises(PeerAuthenticationFailed, match="does not match"):
        verify(identity.public_key, CHALLENGE, signature)


def test_verify_flipped_bit(identity: Identity) -> None:
    """A signature with one bit changed is refused."""
    signature = bytearray(identity.sign(CHALLENGE))
    signature[40] ^= 0x01
    with pytest.raises(PeerAuthenticationFailed):
        verify(identity.public_key, CHALLENGE, bytes(signature))


def test_verify_pinned_peer_id(identity: Identity, other: Identity) -> None:
    """A valid proof by another key fails when a peer id is pinned."""
    with pytest.raises(PeerAuthenticationFailed, match=f"the key offered is {other.peer_id}'s"):
        verify(other.public_key, CHALLENGE, other.sign(CHALLENGE), peer_id=identity.peer_id)


@pytest.mark.parametrize(
    ("key", "complaint"),
    [
        (b"", "not a DER SubjectPublicKeyInfo"),
        (b"\x30\x03\x02\x01\x00", "not a DER SubjectPublicKeyInfo"),
        (
            ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "not an ECDSA P-256 key",
        ),
        (ec.generate_private_key(ec.SECP384R1()).public_key(), "not P-256"),
    ],
)
def test_verify_bad_key(
    identity: Identity, key: bytes | ec.EllipticCurvePublicKey, complaint: str
) -> None:
    """Malformed keys and keys of other types fail authentication, not with ValueError."""
    with pytest.raises(PeerAuthenticationFailed, match=complaint):
        verify(key, CHALLENGE, identity.sign(CHALLENGE))


def test_authentication_error_is_ours() -> None:
    """PeerAuthenticationFailed and the identity file errors are NatTraverseErrors."""
    for kind in (PeerAuthenticationFailed, IdentityFileInsecure, IdentityFileInvalid):
        assert issubclass(kind, NatTraverseError)
    assert issubclass(IdentityFileInsecure, IdentityError)
    assert issubclass(IdentityFileInvalid, IdentityError)


# -- the identity file -----------------------------------------------------


def test_created_private(tmp_path: Path) -> None:
    """The file is created with mode 0600 whatever the umask, holding key and certificate."""
    path = tmp_path / "peer.key"
    old = os.umask(0)
    try:
        identity = load_or_create(path, now=NOW)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == identity.private_key_pem + identity.certificate_pem
    assert os.listdir(tmp_path) == ["peer.key"]


def test_reload_same_identity(tmp_path: Path) -> None:
    """Loading again gives the same peer id and certificate, and leaves the file alone."""
    path = tmp_path / "peer.key"
    first = load_or_create(path, now=NOW)
    content = path.read_bytes()
    second = load_or_create(str(path), now=NOW + YEAR)
    assert second.peer_id == first.peer_id
    assert second.certificate == first.certificate
    assert path.read_bytes() == content


@pytest.mark.parametrize("later", [11 * YEAR, CERTIFICATE_LIFETIME - 86400, -2 * 3600])
def test_certificate_renewed(tmp_path: Path, later: float) -> None:
    """An expired, nearly expired or not yet valid certificate is replaced; the key stays."""
    path = tmp_path / "peer.key"
    first = load_or_create(path, now=NOW)
    renewed = load_or_create(path, now=NOW + later)
    assert renewed.peer_id == first.peer_id
    assert renewed.certificate != first.certificate
    assert renewed.certificate.not_valid_before_utc.timestamp() == NOW + later - 3600
    assert path.read_bytes() == renewed.private_key_pem + renewed.certificate_pem
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["peer.key"]


def test_missing_certificate_made(tmp_path: Path) -> None:
    """A file holding only the key gets a certificate for it."""
    identity = Identity.generate(now=NOW)
    path = tmp_path / "peer.key"
    path.write_bytes(identity.private_key_pem)
    path.chmod(0o600)
    loaded = load_or_create(path, now=NOW)
    assert loaded.peer_id == identity.peer_id
    assert path.read_bytes() == identity.private_key_pem + loaded.certificate_pem


def test_renewal_through_symlink(tmp_path: Path) -> None:
    """Renewing through a symbolic link rewrites the target and keeps the link."""
    target = tmp_path / "real.key"
    link = tmp_path / "peer.key"
    first = load_or_create(target, now=NOW)
    link.symlink_to(target)
    renewed = load_or_create(link, now=NOW + 11 * YEAR)
    assert link.is_symlink()
    assert renewed.peer_id == first.peer_id
    assert target.read_bytes().endswith(renewed.certificate_pem)


def test_renewal_unsaved_when_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the renewed file cannot be written the new certificate is still used."""
    path = tmp_path / "peer.key"
    first = load_or_create(path, now=NOW)
    content = path.read_bytes()

    def refuse(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    renewed = load_or_create(path, now=NOW + 11 * YEAR)
    assert renewed.peer_id == first.peer_id
    assert renewed.certificate.not_valid_after_utc.timestamp() > NOW + 20 * YEAR
    assert path.read_bytes() == content
    assert os.listdir(tmp_path) == ["peer.key"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o700 | 0o010])
def test_refuses_open_permissions(tmp_path: Path, mode: int) -> None:
    """A key file others may read or change is refused, saying to chmod 600."""
    path = tmp_path / "peer key"
    load_or_create(path, now=NOW)
    path.chmod(mode)
    with pytest.raises(IdentityFileInsecure, match=f"mode {mode:04o}") as info:
        load_or_create(path, now=NOW)
    assert f"chmod 600 '{path}'" in str(info.value)
    assert info.value.path == str(path)


def test_refuses_other_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key file belonging to another user is refused."""
    path = tmp_path / "peer.key"
    load_or_create(path, now=NOW)
    owner = path.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with pytest.raises(IdentityFileInsecure, match=f"belongs to user id {owner}"):
        load_or_create(path, now=NOW)


def test_refuses_directory(tmp_path: Path) -> None:
    """A directory in place of the file is refused, not replaced."""
    with pytest.raises(IdentityError, match="not a regular file"):
        load_or_create(tmp_path, now=NOW)


def test_missing_directory(tmp_path: Path) -> None:
    """A missing directory is reported with the path, not created."""
    path = tmp_path / "absent" / "peer.key"
    with pytest.raises(IdentityError, match=f"identity file {path}: cannot create a file"):
        load_or_create(path, now=NOW)


def test_dangling_symlink(tmp_path: Path) -> None:
    """A dangling symbolic link is reported, not replaced."""
    path = tmp_path / "peer.key"
    path.symlink_to(tmp_path / "elsewhere" / "peer.key")
    with pytest.raises(IdentityError, match="dangling symbolic link"):
        load_or_create(path, now=NOW)
    assert path.is_symlink()


def _corruptions() -> list[tuple[str, bytes, str]]:
    a = Identity.generate(now=NOW)
    b = Identity.generate(now=NOW)
    key, cert = a.private_key_pem, a.certificate_pem
    rsa_like = serialization.load_pem_private_key(key, password=None)
    assert isinstance(rsa_like, ec.EllipticCurvePrivateKey)
    encrypted = rsa_like.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    other_curve = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    damaged_key = key.replace(key[40:48], b"AAAAAAAA")
    return [
        ("empty", b"", "holds no PEM private key"),
        ("garbage", b"\x00\xff not pem at all", "holds no PEM private key"),
        ("truncated", (key + cert)[:-100], "without its END line"),
        ("cut key", key[: len(key) // 2], "holds no PEM private key"),
        ("certificate only", cert, "holds 0 private keys"),
        ("two keys", key + b.private_key_pem + cert, "holds 2 private keys"),
        ("two certificates", key + cert + cert, "holds 2 certificates"),
        ("foreign certificate", key + b.certificate_pem, "certificate is not for the key"),
        ("damaged key", damaged_key + cert, "cannot be decoded"),
        ("damaged certificate", key + cert.replace(cert[40:60], b"A" * 20), "cannot be decoded"),
        ("encrypted", encrypted + cert, "encrypted private key"),
        ("other curve", other_curve, "not P-256"),
        ("extra block", key + cert + b"-----BEGIN X-----\nAA==\n-----END X-----\n", ": X"),
        ("huge", key + cert + b"\n" * 70_000, "larger than 65536 bytes"),
    ]


@pytest.mark.parametrize(
    ("content", "complaint"), [c[1:] for c in _corruptions()], ids=[c[0] for c in _corruptions()]
)
def test_refuses_invalid_file(tmp_path: Path, content: bytes, complaint: str) -> None:
    """A damaged or foreign file is refused, naming the path, and left as it is."""
    path = tmp_path / "peer.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityFileInvalid, match=f"identity file {path}: ") as info:
        load_or_create(path, now=NOW)
    assert complaint in str(info.value)
    assert path.read_bytes() == content


def _create_at_once(path: Path, count: int) -> list[PeerId | BaseException]:
    barrier = threading.Barrier(count)
    results: list[PeerId | BaseException] = []

    def create() -> None:
        barrier.wait()
        try:
            results.append(load_or_create(path, now=NOW).peer_id)
        except BaseException as e:
            results.append(e)

    threads = [threading.Thread(target=create) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("attempt", range(5))
def test_concurrent_first_use(tmp_path: Path, attempt: int) -> None:
    """Many creators at once end with one identity, and no temporary files."""
    path = tmp_path / "peer.key"
    results = _create_at_once(path, 12)
    assert len(results) == 12
    assert set(results) == {load_or_create(path, now=NOW).peer_id}
    assert os.listdir(tmp_path) == ["peer.key"]


def test_lost_race_loads_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A creator that finds the file made meanwhile loads it instead of replacing it."""
    path = tmp_path / "peer.key"
    winner = Identity.generate(now=NOW)
    generate = Identity.generate

    def generate_then_lose(*, now: float | None = None) -> Identity:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, winner.private_key_pem + winner.certificate_pem)
        os.close(fd)
        return generate(now=now)

    monkeypatch.setattr(Identity, "generate", staticmethod(generate_then_lose))
    assert load_or_create(path, now=NOW).peer_id == winner.peer_id
    assert os.listdir(tmp_path) == ["peer.key"]
