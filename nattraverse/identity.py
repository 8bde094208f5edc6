"""
Peer identity (DESIGN section 3, step 1): a key pair kept in a private file,
a self-signed certificate for it, and the peer id derived from the public key.

A peer id is ``"nt1"`` followed by the SHA-256 hash of the public key's DER
``SubjectPublicKeyInfo``, in lowercase base32 (RFC 4648 section 6) without
padding: 55 characters from ``a-z`` and ``2-7``, so it fits a certificate
common name (64 characters at most), a DNS label (63) and an endpoint string
without escaping.  The ``1`` is the version of this encoding; the key type
needs none, since the ``SubjectPublicKeyInfo`` names its algorithm.

The key is ECDSA on P-256 (secp256r1) with SHA-256.  Ed25519 would do as
well for the proof given to the rendezvous, but the same key must also sign
TLS 1.3 handshakes (OpenSSL via pyOpenSSL, for TCP paths) and QUIC ones
(aioquic, for UDP paths, DESIGN section 3 step 6).  ``ecdsa_secp256r1_sha256``
is the one signature scheme every TLS 1.3 implementation must support
(RFC 8446 section 9.1) and the first that every aioquic release offers,
whereas some aioquic releases leave Ed25519 out of their default list.
P-256 keys also live in TPMs, HSMs and secure enclaves.  The cost, ECDSA's
need for a good random nonce at each signature, is carried by OpenSSL.

Proof of possession (:meth:`Identity.sign`, :func:`verify`) signs
``PROOF_CONTEXT + challenge``: the fixed context keeps a rendezvous server
from having a peer sign bytes that mean something elsewhere.  A signature is
64 bytes, ``r`` then ``s`` as 32-byte big-endian integers (IEEE P1363, as in
JWS ``ES256``), which is simpler to frame than DER.  A verifier must choose a
fresh random challenge of at least 16 bytes for each proof.

:func:`load_or_create` keeps the key in a PEM file readable by its owner
only (see ``docs/identity.rst``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import os
import re
import secrets
import shlex
import stat
import time
from dataclasses import dataclass
from typing import Final, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.logger import Logger

from nattraverse.errors import (
    IdentityError,
    IdentityFileInsecure,
    IdentityFileInvalid,
    PeerAuthenticationFailed,
)

__all__ = [
    "CERTIFICATE_LIFETIME",
    "PEER_ID_PREFIX",
    "PROOF_CONTEXT",
    "SIGNATURE_SIZE",
    "Identity",
    "PeerId",
    "PublicKeyLike",
    "load_or_create",
    "peer_id_of_certificate",
    "verify",
]

_log = Logger()

#: The text every peer id starts with: "nattraverse", version 1.
PEER_ID_PREFIX: Final = "nt1"
#: Prepended to every challenge before it is signed (domain separation).
PROOF_CONTEXT: Final = b"nattraverse peer identity proof v1\x00"
#: Size of a signature from :meth:`Identity.sign`: ``r || s``.
SIGNATURE_SIZE: Final = 64
#: How long a new certificate is valid, in seconds (about ten years).
CERTIFICATE_LIFETIME: Final = 3653 * 86400.0
#: How far before ``now`` a new certificate starts, for peers whose clock is behind.
_BACKDATE: Final = 3600.0
#: A certificate closer than this to its end is renewed when the file is loaded.
_RENEW_BEFORE: Final = 30 * 86400.0
#: An identity file is a key and a certificate: a few kilobytes at most.
_MAX_FILE_SIZE: Final = 64 * 1024

_DIGEST_SIZE: Final = 32
_SCALAR_SIZE: Final = 32
_BODY_LENGTH: Final = 52  # ceil(256 / 5) base32 characters
_BODY = re.compile(r"[a-z2-7]{52}", re.ASCII)
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_SIGNATURE_ALGORITHM = ec.ECDSA(hashes.SHA256())

#: What :func:`verify` accepts as a key: a key object, a certificate, or the
#: DER ``SubjectPublicKeyInfo`` bytes received from a peer.
PublicKeyLike: TypeAlias = ec.EllipticCurvePublicKey | x509.Certificate | bytes


def _spki_digest(key_or_certificate: CertificatePublicKeyTypes | x509.Certificate) -> bytes:
    if isinstance(key_or_certificate, x509.Certificate):
        key_or_certificate = key_or_certificate.public_key()
    der = key_or_certificate.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


@dataclass(frozen=True, slots=True)
class PeerId:
    """
    Who a peer is: the SHA-256 hash of its public key.  ``str()`` gives the
    text form (``nt1`` and 52 base32 characters); :meth:`parse` reads it.

    Compare ids with ``==`` (they are public values); check a key or a
    certificate against a pinned id with :meth:`matches`.

    :ivar digest: The 32-byte SHA-256 hash of the DER SubjectPublicKeyInfo.
    """

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != _DIGEST_SIZE:
            raise ValueError(f"a peer id digest is {_DIGEST_SIZE} bytes, not {self.digest!r}")

    def __str__(self) -> str:
        body = base64.b32encode(self.digest).decode("ascii").rstrip("=").lower()
        return PEER_ID_PREFIX + body

    def __repr__(self) -> str:
        return f"PeerId.parse({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> PeerId:
        """
        Read a peer id from its text form.  Only the canonical form is
        accepted (lowercase, no padding, unused bits zero), so every peer id
        has exactly one text.

        :raises ValueError: saying what is wrong with *text*.
        """
        shown = repr(text[:80]) + ("..." if len(text) > 80 else "")
        if not text.startswith(PEER_ID_PREFIX):
            raise ValueError(f"{shown} is not a peer id: it does not start with {PEER_ID_PREFIX!r}")
        body = text[len(PEER_ID_PREFIX) :]
        if len(body) != _BODY_LENGTH:
            raise ValueError(
                f"{shown} is not a peer id: it has {len(body)} characters after "
                f"{PEER_ID_PREFIX!r}, not {_BODY_LENGTH}; was it cut or run together with "
                "other text?"
            )
        if not _BODY.fullmatch(body):
            raise ValueError(
                f"{shown} is not a peer id: after {PEER_ID_PREFIX!r} only lowercase letters "
                "and the digits 2-7 may appear"
            )
        peer_id = cls(base64.b32decode(body.upper() + "====", casefold=False))
        if str(peer_id) != text:
            raise ValueError(
                f"{shown} is not a peer id: its last character is not one a peer id can end "
                "with (it would carry bits beyond the 256-bit hash); copy the id again"
            )
        return peer_id

    @classmethod
    def of(cls, key_or_certificate: CertificatePublicKeyTypes | x509.Certificate) -> PeerId:
        """
        The peer id of a public key, or of the key of a certificate.
        """
        return cls(_spki_digest(key_or_certificate))

    def matches(self, key_or_certificate: CertificatePublicKeyTypes | x509.Certificate) -> bool:
        """
        Whether a public key, or a certificate's key, is this peer's key;
        the hashes are compared in constant time.  This is the check that
        pins a TLS or QUIC peer certificate to the peer id.
        """
        return hmac.compare_digest(self.digest, _spki_digest(key_or_certificate))


def peer_id_of_certificate(certificate: x509.Certificate) -> PeerId:
    """
    The peer id of the key in *certificate*.  Only the key counts: the
    subject, the validity and the signature of the certificate do not.
    """
    return PeerId.of(certificate)


def _require_p256(key: object, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        raise ValueError(f"{what} is {type(key).__name__}, not an ECDSA P-256 key")
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{what} is on curve {key.curve.name}, not P-256 (secp256r1)")


def _self_signed_certificate(
    private_key: ec.EllipticCurvePrivateKey, now: float
) -> x509.Certificate:
    public_key = private_key.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(PeerId.of(public_key)))])
    utc = datetime.UTC
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(now - _BACKDATE, utc))
        .not_valid_after(datetime.datetime.fromtimestamp(now + CERTIFICATE_LIFETIME, utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(private_key, hashes.SHA256())
    )


def _certificate_is_current(certificate: x509.Certificate, now: float) -> bool:
    start = certificate.not_valid_before_utc.timestamp()
    end = certificate.not_valid_after_utc.timestamp()
    return start <= now < end - _RENEW_BEFORE


class Identity:
    """
    This peer's key pair and its self-signed certificate.

    The certificate's subject common name is the peer id, it is valid for
    TLS server and client authentication, and it is not a CA.  Nobody checks
    its signature or dates: peers pin the key through the peer id.

    :raises ValueError: when the key is not ECDSA P-256 or the certificate
        is not for this key.
    """

    def __init__(
        self, private_key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate
    ) -> None:
        _require_p256(private_key, "the private key")
        peer_id = PeerId.of(private_key.public_key())
        if not peer_id.matches(certificate):
            raise ValueError(f"the certificate is not for the key of {peer_id}")
        self._private_key = private_key
        self._certificate = certificate
        self._peer_id = peer_id

    @classmethod
    def generate(cls, *, now: float | None = None) -> Identity:
        """
        A new key pair and a certificate valid from an hour before *now*
        (POSIX seconds, as ``reactor.seconds()`` gives; the system clock by
        default) for :data:`CERTIFICATE_LIFETIME`.
        """
        when = time.time() if now is None else now
        private_key = ec.generate_private_key(ec.SECP256R1())
        return cls(private_key, _self_signed_certificate(private_key, when))

    def with_new_certificate(self, *, now: float | None = None) -> Identity:
        """
        The same key, hence the same peer id, with a new certificate.
        """
        when = time.time() if now is None else now
        return Identity(self._private_key, _self_signed_certificate(self._private_key, when))

    def __repr__(self) -> str:
        return f"<Identity {self._peer_id}>"

    @property
    def peer_id(self) -> PeerId:
        """This peer's id."""
        return self._peer_id

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The private key, for TLS and QUIC contexts.  Never send it anywhere."""
        return self._private_key

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public key."""
        return self._private_key.public_key()

    @property
    def public_key_der(self) -> bytes:
        """The public key as DER SubjectPublicKeyInfo: what a peer id hashes."""
        return self.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def certificate(self) -> x509.Certificate:
        """The self-signed certificate."""
        return self._certificate

    @property
    def certificate_der(self) -> bytes:
        """The certificate, DER encoded."""
        return self._certificate.public_bytes(serialization.Encoding.DER)

    @property
    def certificate_pem(self) -> bytes:
        """The certificate, PEM encoded."""
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def private_key_pem(self) -> bytes:
        """The private key, unencrypted PKCS #8 PEM.  Handle with care."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, challenge: bytes) -> bytes:
        """
        Prove possession of the key: sign ``PROOF_CONTEXT + challenge``.

        :returns: :data:`SIGNATURE_SIZE` bytes, ``r || s`` big-endian; check
            them with :func:`verify`.
        """
        der = self._private_key.sign(PROOF_CONTEXT + challenge, _SIGNATURE_ALGORITHM)
        r, s = decode_dss_signature(der)
        return r.to_bytes(_SCALAR_SIZE, "big") + s.to_bytes(_SCALAR_SIZE, "big")


def _load_public_key(key: PublicKeyLike) -> ec.EllipticCurvePublicKey:
    loaded: object
    if isinstance(key, x509.Certificate):
        loaded = key.public_key()
    elif isinstance(key, bytes):
        try:
            loaded = serialization.load_der_public_key(key)
        except (ValueError, UnsupportedAlgorithm):
            raise PeerAuthenticationFailed(
                "the public key is not a DER SubjectPublicKeyInfo"
            ) from None
    else:
        loaded = key
    try:
        _require_p256(loaded, "the public key")
    except ValueError as e:
        raise PeerAuthenticationFailed(str(e)) from None
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    return loaded


def verify(
    key: PublicKeyLike, challenge: bytes, signature: bytes, *, peer_id: PeerId | None = None
) -> PeerId:
    """
    Check a proof of possession made by :meth:`Identity.sign`.

    A peer id alone cannot check a signature (it is a hash of the key), so
    the prover sends its key, as DER SubjectPublicKeyInfo or in its
    certificate; the verifier learns the peer id from the result, or pins
    the one it expects with *peer_id*.

    :param key: The prover's public key, certificate, or DER
        SubjectPublicKeyInfo as received.
    :param challenge: The challenge the verifier chose (fresh, random, at
        least 16 bytes).
    :param signature: What the prover sent back.
    :param peer_id: When given, the key must be this peer's key.
    :returns: The peer id of the key that made the signature.
    :raises PeerAuthenticationFailed: when the key is malformed or not
        ECDSA P-256, is not *peer_id*'s key, or the signature does not
        verify.
    """
    public_key = _load_public_key(key)
    if peer_id is not None and not peer_id.matches(public_key):
        raise PeerAuthenticationFailed(f"the key offered is {PeerId.of(public_key)}'s", peer_id)
    expected = peer_id if peer_id is not None else PeerId.of(public_key)
    if len(signature) != SIGNATURE_SIZE:
        raise PeerAuthenticationFailed(
            f"the signature is {len(signature)} bytes, not {SIGNATURE_SIZE}", expected
        )
    r = int.from_bytes(signature[:_SCALAR_SIZE], "big")
    s = int.from_bytes(signature[_SCALAR_SIZE:], "big")
    try:
        public_key.verify(
            encode_dss_signature(r, s), PROOF_CONTEXT + challenge, _SIGNATURE_ALGORITHM
        )
    except InvalidSignature:
        raise PeerAuthenticationFailed(
            "the signature does not match the challenge and key", expected
        ) from None
    return expected


# -- the identity file ------------------------------------------------------


def load_or_create(path: str | os.PathLike[str], *, now: float | None = None) -> Identity:
    """
    Load this peer's identity from *path*, creating it on first use.

    The file holds the private key (unencrypted PKCS #8 PEM) and then the
    certificate (PEM).  It is created with mode ``0600`` and never exists in
    any other state: the content is written and synced to a ``0600``
    temporary file in the same directory, which is then hard-linked to
    *path*.  Linking fails when *path* exists, so when several processes
    start at once exactly one creates the file and the others load it: all
    end with the same peer id.

    When the file exists, it must be a regular file owned by the current
    user with no group or other permissions.  A certificate that is missing,
    not yet valid at *now*, or within 30 days of its end is replaced (the
    key, hence the peer id, stays) and the file rewritten the same careful
    way; if that write fails, the new certificate is used anyway and a
    warning logged.

    :param now: POSIX seconds, such as ``reactor.seconds()``; the system
        clock by default.
    :raises IdentityFileInsecure: when others may read or change the file.
    :raises IdentityFileInvalid: when the file is not a usable identity.
    :raises IdentityError: when the file cannot be read or created.
    """
    name = os.fspath(path)
    when = time.time() if now is None else now
    try:
        loaded = _load(name, when)
    except FileNotFoundError:
        identity = Identity.generate(now=when)
        if _create_exclusively(name, _file_content(identity)):
            _log.info("created identity {peer_id} in {path}", peer_id=identity.peer_id, path=name)
            return identity
        try:
            loaded = _load(name, when)
        except FileNotFoundError:
            raise IdentityError(
                name, "the name exists but cannot be opened; is it a dangling symbolic link?"
            ) from None
    if isinstance(loaded, Identity):
        return loaded
    identity = Identity(loaded, _self_signed_certificate(loaded, when))
    real = os.path.realpath(name)
    try:
        _write_new_file(real, _file_content(identity), replace=True)
    except IdentityError as e:
        _log.warn(
            "could not save the renewed certificate of {peer_id}: {error}",
            peer_id=identity.peer_id,
            error=e,
        )
    else:
        _log.info(
            "renewed the certificate of {peer_id} in {path}", peer_id=identity.peer_id, path=real
        )
    return identity


def _file_content(identity: Identity) -> bytes:
    return identity.private_key_pem + identity.certificate_pem


def _load(path: str, now: float) -> Identity | ec.EllipticCurvePrivateKey:
    """
    The identity in *path*; or only its key, when the certificate is missing
    or not current and a new one is needed.

    :raises FileNotFoundError: when there is no file at *path*.
    """
    private_key, certificate = _parse(path, _read_private_file(path))
    if certificate is None:
        return private_key
    try:
        identity = Identity(private_key, certificate)
    except ValueError:
        raise IdentityFileInvalid(
            path,
            "the certificate is not for the key in the file; remove the CERTIFICATE "
            "block to have a new one made for the key",
        ) from None
    if not _certificate_is_current(certificate, now):
        return private_key
    return identity


def _read_private_file(path: str) -> bytes:
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise IdentityError(path, f"cannot be opened: {e.strerror}") from None
    try:
        _check_private(path, os.fstat(fd))
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, _MAX_FILE_SIZE + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_FILE_SIZE:
                raise IdentityFileInvalid(
                    path, f"is larger than {_MAX_FILE_SIZE} bytes: not an identity"
                )
    except OSError as e:
        raise IdentityError(path, f"cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def _check_private(path: str, status: os.stat_result) -> None:
    """
    Refuse what is not a regular file of this user's, private to them.
    """
    if not stat.S_ISREG(status.st_mode):
        raise IdentityError(path, "is not a regular file")
    user = os.geteuid()
    if status.st_uid != user:
        raise IdentityFileInsecure(
            path,
            f"belongs to user id {status.st_uid}, not to this user (id {user}); a private "
            "key must belong to the user who uses it: chown it, or run as its owner",
        )
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        raise IdentityFileInsecure(
            path,
            f"other users may read or change it (mode {mode:04o}); a private key must be "
            f"private: run chmod 600 {shlex.quote(path)}",
        )


def _parse(path: str, data: bytes) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate | None]:
    blocks = list(_PEM_BLOCK.finditer(data))
    if not blocks:
        raise IdentityFileInvalid(path, "holds no PEM private key (empty or not PEM)")
    if data.count(b"-----BEGIN ") != len(blocks):
        raise IdentityFileInvalid(path, "has a PEM block without its END line (truncated?)")
    keys = [b for b in blocks if b[1].endswith(b"PRIVATE KEY")]
    certificates = [b for b in blocks if b[1] == b"CERTIFICATE"]
    if len(keys) != 1:
        raise IdentityFileInvalid(path, f"holds {len(keys)} private keys, not 1")
    if len(certificates) > 1:
        raise IdentityFileInvalid(path, f"holds {len(certificates)} certificates, not 1")
    if len(keys) + len(certificates) != len(blocks):
        others = sorted({b[1].decode("ascii") for b in blocks if b not in keys + certificates})
        raise IdentityFileInvalid(path, f"holds unexpected PEM blocks: {', '.join(others)}")
    try:
        private_key = serialization.load_pem_private_key(keys[0][0], password=None)
    except TypeError:
        raise IdentityFileInvalid(
            path, "holds an encrypted private key; nattraverse needs an unencrypted one"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise IdentityFileInvalid(path, "holds a private key that cannot be decoded") from None
    try:
        _require_p256(private_key, "the private key")
    except ValueError as e:
        raise IdentityFileInvalid(path, f"{e}; nattraverse identities are P-256 keys") from None
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    if not certificates:
        return private_key, None
    try:
        certificate = x509.load_pem_x509_certificate(certificates[0][0])
    except ValueError:
        raise IdentityFileInvalid(path, "holds a certificate that cannot be decoded") from None
    return private_key, certificate


def _create_exclusively(path: str, content: bytes) -> bool:
    """
    Create *path* with *content* unless it exists.

    :returns: whether this call created it.
    """
    try:
        _write_new_file(path, content, replace=False)
    except FileExistsError:
        return False
    return True


def _write_new_file(path: str, content: bytes, *, replace: bool) -> None:
    """
    Give *path* the *content*, through a ``0600`` temporary file in the same
    directory, synced before it takes the name.  With *replace*, an existing
    file is replaced (rename); without, :class:`FileExistsError` is raised
    when *path* exists (hard link, which never replaces).
    """
    directory, base = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(temporary, flags, 0o600)
    except OSError as e:
        raise IdentityError(path, f"cannot create a file in {directory}: {e.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    except FileExistsError:
        raise
    except OSError as e:
        raise IdentityError(path, f"cannot be written: {e.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
