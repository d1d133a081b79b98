"""meshward's PKI: a built-in CA that issues SPIFFE X.509-SVIDs and gateway certificates.

:class:`CertificateAuthority` signs; :class:`CredentialStore` issues what a policy's
node groups need and rotates it at half-life; :class:`IssuedCert` is one certificate
with its key (never shown in ``repr``) and chain.
"""

from meshward.pki.ca import CertificateAuthority
from meshward.pki.errors import PkiError
from meshward.pki.issued import IssuedCert, utc_now
from meshward.pki.store import CredentialStore, identities_in

__all__ = [
    "CertificateAuthority",
    "CredentialStore",
    "IssuedCert",
    "PkiError",
    "identities_in",
    "utc_now",
]
