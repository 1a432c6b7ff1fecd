"""Delegation chains: the agents upstream of the caller, each link bound to its place.

`x-spiffe-delegation` metadata holds JWT-SVIDs separated by commas, outermost
first. Link `i` is minted by the agent `sub_i` for the next hop: the next
link's `sub`, or, for the last link, the caller the sidecar verified. Its
`aud` must be exactly one value (`link_audience`):

    <identity.delegation_audience>?to=<next hop's SPIFFE ID>                   the outermost link
    <identity.delegation_audience>?from=<previous hop>&to=<next hop>           every later link

so a link is accepted only in the place it was minted for:

- under another caller: the last link's `to` names the caller;
- reordered, or with a middle or the last link dropped: a `to` or `from`
  no longer names its neighbour;
- with the outermost links dropped: the new outermost link names a `from`;
- repeated, or naming the caller inside its own chain: refused outright
  (each agent appears once);
- as a caller's own token, or a caller's token as a link: the caller
  audience (`identity.jwt_audience`) is one value with no `?to=`, and config
  refuses a delegation audience equal to it.

SPIFFE IDs cannot hold `?`, `&`, `=`, `#` or spaces, and config refuses them
in the delegation audience, so each (audience, from, to) has one spelling.
Links bind identities and places, not a task: keep their lifetime short.
"""

from __future__ import annotations

from typing import Mapping

from sidecar.identity import IdentityError, Subject
from sidecar.identity.jwt_svid import AudienceMismatch, JwtSvidInvalid, JwtSvidValidator, unverified_sub
from sidecar.identity.x509 import shorten

DELEGATION_METADATA = "x-spiffe-delegation"
DEFAULT_MAX_DELEGATION_LINKS = 8
AUDIENCE_FORBIDDEN = frozenset("?&=#")


def link_audience(delegation_audience: str, *, to: str, from_: str | None = None) -> str:
    """The one audience of a delegation link minted for `to`, after `from_` (None: the outermost link).

    An agent mints its link with py-spiffe as
    `fetch_jwt_svid(audience={link_audience(base, to=next_hop, from_=upstream)})`.
    Raises ValueError for an audience that could be spelled two ways.
    """
    if not delegation_audience or any(c in AUDIENCE_FORBIDDEN or c.isspace() for c in delegation_audience):
        raise ValueError("the delegation audience must be non-empty, without spaces, '?', '&', '=' or '#'")
    if from_ is None:
        return f"{delegation_audience}?to={to}"
    return f"{delegation_audience}?from={from_}&to={to}"


class DelegationVerifier:
    """Turns `x-spiffe-delegation` metadata into verified subjects, outermost first.

    `validator.audience` is `identity.delegation_audience`; None refuses every
    chain with `unavailable` as the reason.
    """

    def __init__(
        self,
        validator: JwtSvidValidator | None,
        max_links: int = DEFAULT_MAX_DELEGATION_LINKS,
        unavailable: str = "no JWT bundles to verify it with (dev identity)",
    ):
        self._validator = validator
        self._max_links = max_links
        self._unavailable = unavailable

    def verify(self, metadata: Mapping[str, str], caller: str) -> tuple[Subject, ...]:
        """The chain upstream of `caller` (its verified SPIFFE ID); raises IdentityError naming the bad link."""
        raw = metadata.get(DELEGATION_METADATA)
        if raw is None:
            return ()
        tokens = [t.strip() for t in raw.split(",")]
        if not raw.strip() or any(not t for t in tokens):
            raise IdentityError(f"delegation: {DELEGATION_METADATA} must be JWT-SVIDs separated by commas, none empty")
        if self._max_links == 0:
            raise IdentityError("delegation: delegation chains are not accepted (identity.max_delegation_links is 0)")
        if len(tokens) > self._max_links:
            raise IdentityError(f"delegation: {len(tokens)} links, more than the {self._max_links} allowed")
        if self._validator is None:
            raise IdentityError(f"delegation: the chain cannot be verified here: {self._unavailable}")
        subs = []
        for index, token in enumerate(tokens):
            try:
                subs.append(unverified_sub(token))
            except JwtSvidInvalid as exc:
                raise IdentityError(f"delegation[{index}]: {exc}") from None
        for index, sub in enumerate(subs):
            if sub == caller:
                raise IdentityError(
                    f"delegation[{index}]: {shorten(sub)} is the caller itself; a caller is never in its own chain"
                )
            if sub in subs[:index]:
                raise IdentityError(
                    f"delegation[{index}]: {shorten(sub)} already appears as delegation[{subs.index(sub)}]; "
                    "each agent appears once in a chain"
                )
        base = self._validator.audience
        links = []
        for index, token in enumerate(tokens):
            to = subs[index + 1] if index + 1 < len(subs) else caller
            from_ = subs[index - 1] if index > 0 else None
            expected = link_audience(base, to=to, from_=from_)
            try:
                verified = self._validator.validate(token, expected)
            except AudienceMismatch as exc:
                place = f"from {from_} " if from_ else "as the outermost link "
                raise IdentityError(
                    f"delegation[{index}]: the link is not bound to this place in the chain ({exc}); "
                    f"a link {place}to {to} has the one audience {expected!r}"
                ) from None
            except JwtSvidInvalid as exc:
                raise IdentityError(f"delegation[{index}]: {exc}") from None
            links.append(verified.subject(source="jwt_svid"))
        return tuple(links)
