"""Reading and writing CA files: PEM parsing with clear errors, and key files that are
never readable by others, not even for an instant (created ``O_EXCL`` with mode 0600)."""

from __future__ import annotations

import logging
import os
import secrets
import stat
import time
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshward.pki.errors import PkiError

log = logging.getLogger("meshward.pki")

#: The private-key types a meshward CA may sign with.
CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def read_bytes(path: Path, what: str) -> bytes:
    """Read a whole file, turning OS errors into a :class:`PkiError` that names it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path}: {what} not found; check the path") from None
    except OSError as err:
        raise PkiError(
            f"{path}: cannot read the {what} ({err.strerror}); make it readable by meshward"
        ) from None


def read_certificate(path: Path, what: str) -> x509.Certificate:
    """The single PEM certificate in ``path``."""
    data = read_bytes(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise PkiError(
            f"{path}: not a PEM certificate; give the {what} in PEM form "
            "('-----BEGIN CERTIFICATE-----')"
        ) from None
    if len(certs) != 1:
        raise PkiError(
            f"{path}: holds {len(certs)} certificates; give only the CA certificate that "
            "signs workload certificates"
        )
    return certs[0]


def read_private_key(path: Path) -> CaKey:
    """The unencrypted PEM private key in ``path`` (ECDSA or RSA)."""
    data = read_bytes(path, "CA private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PkiError(
            f"{path}: the CA private key is encrypted; give meshward an unencrypted key "
            f"(e.g. 'openssl pkey -in {path} -out ca.key') in a file only it can read"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(
            f"{path}: not a PEM private key; give the CA's key in PEM form "
            "('-----BEGIN PRIVATE KEY-----')"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(
            f"{path}: {type(key).__name__} keys are not supported for a CA; use ECDSA or RSA"
        )
    warn_if_shared(path)
    return key


def warn_if_shared(path: Path) -> None:
    """Log a warning when a private-key file is readable by group or others."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "CA private key file is accessible to group or others; run chmod 600 on it",
            extra={"file": str(path), "mode": oct(mode)},
        )


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` with mode 0700 if it does not exist yet."""
    if directory.exists():
        if not directory.is_dir():
            raise PkiError(f"{directory}: exists but is not a directory; give a CA directory")
        return
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        return  # created by a concurrent meshward process
    except OSError as err:
        raise PkiError(
            f"{directory}: cannot create the CA directory ({err.strerror}); "
            "choose a directory meshward can write"
        ) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_new_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist) with mode 0600 from the start and write ``data``.

    Raises ``FileExistsError`` if another process created it first.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may only have narrowed it; make it exact
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def write_public_file(path: Path, data: bytes) -> None:
    """Atomically (temporary file + rename) write ``path`` with mode 0644."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644)
    try:
        os.fchmod(fd, 0o644)
        _write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def sync_dir(directory: Path) -> None:
    """fsync a directory so that new names in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def wait_for_pair(cert_file: Path, key_file: Path, timeout: float) -> None:
    """Wait up to ``timeout`` s for both CA files to exist (another process may be
    creating them right now); raise a :class:`PkiError` naming the missing one."""
    deadline = time.monotonic() + timeout
    while True:
        has_cert, has_key = cert_file.exists(), key_file.exists()
        if has_cert and has_key:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not has_cert and not has_key:
        raise PkiError(f"{cert_file} and {key_file}: both missing; run meshward again")
    if has_cert:
        raise PkiError(
            f"{key_file}: missing, but {cert_file} exists; restore the CA key, or move "
            f"{cert_file} away to create a new CA (every proxy must then trust the new bundle)"
        )
    raise PkiError(
        f"{cert_file}: missing, but {key_file} exists (an interrupted first run?); restore "
        f"the CA certificate, or delete {key_file} to create a new CA"
    )
