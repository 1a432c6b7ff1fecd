"""The dev identity: a fixed local SPIFFE ID, marked `source: dev` everywhere.

Only for a laptop or a demo; config refuses it next to any real source.
"""

from __future__ import annotations

from sidecar.identity import CallerIdentity, PeerInfo, Subject
from sidecar.identity.spiffe_id import validate_spiffe_id

DEFAULT_DEV_SPIFFE_ID = "spiffe://dev.local/agent"


class DevIdentityResolver:
    def __init__(self, spiffe_id: str = DEFAULT_DEV_SPIFFE_ID):
        self._identity = CallerIdentity(Subject(validate_spiffe_id(spiffe_id), source="dev"))

    def resolve(self, peer: PeerInfo) -> CallerIdentity:
        return self._identity

    def health(self) -> tuple[bool, str]:
        return True, (f"DEV MODE: every caller is the dev identity {self._identity.subject.spiffe_id} (source: dev), "
                      "and approvals are open (docs/configuration.md#outside-dev-mode)")
