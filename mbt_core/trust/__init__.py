"""WHO IS TRUSTED: signing keys, signed documents, trust roots, node rosters and the cluster's
X.509 certificates, and the trust and TLS settings a process starts with.
"""

from mbt_core.trust.certs import TlsMaterial, init_ca, issue_cert
from mbt_core.trust.config import TlsConfig, TrustConfig
from mbt_core.trust.keys import generate_key, key_id, load_private_key, load_public_key
from mbt_core.trust.root import Trust, TrustRoot, resolve_trust_root
from mbt_core.trust.roster import Roster, load_roster

__all__ = [
    "Roster",
    "TlsConfig",
    "TlsMaterial",
    "Trust",
    "TrustConfig",
    "TrustRoot",
    "generate_key",
    "init_ca",
    "issue_cert",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_roster",
    "resolve_trust_root",
]
