"""Who may send: the calling-AE allow-list (``--allow-aet``) and the rejection of
associations it does not admit, or whose request is unusable."""

from __future__ import annotations

import logging
import socket
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pynetdicom import evt

from scp.config import check_ae_title
from scp.errors import SortscpError
from scp.log import safe
from scp.net import _pynetdicom

log = logging.getLogger(__name__)

#: A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognized.
REJECT_CALLING_AET = (0x01, 0x01, 0x03)
#: A-ASSOCIATE-RJ: rejected-permanent, by the service user, called AE title not recognized.
REJECT_CALLED_AET = (0x01, 0x01, 0x07)
#: A-ASSOCIATE-RJ: rejected-transient, by the service provider (presentation), local limit
#: exceeded: what pynetdicom sends at its own limit.
REJECT_LIMIT = (0x02, 0x03, 0x02)
#: Associations beyond ``--max-associations`` for a C-ECHO alone (a request that proposes
#: nothing but Verification): a health check (the image's, a monitor's) still gets its answer
#: from a server busy with as many senders as it takes, which it would otherwise report as down.
ECHO_RESERVE = 2
VERIFICATION_UID = "1.2.840.10008.1.1"


class SecurityConfigError(SortscpError):
    """An access rule or a TLS file is not usable."""


@dataclass(frozen=True)
class AllowRule:
    """A calling AE title that may associate, optionally only from some addresses.

    Examples
    --------
    >>> AllowRule.parse("MODALITY1@127.0.0.1").allows("MODALITY1", "127.0.0.1")
    True
    >>> AllowRule.parse("MODALITY1@127.0.0.1").allows("MODALITY1", "10.0.0.9")
    False
    """

    title: str
    host: str | None = None
    addresses: frozenset[str] | None = None  #: None: any address

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """``TITLE`` or ``TITLE@HOST``; HOST (a name or an address) is resolved now."""
        title, at, host = text.strip().rpartition("@")
        if not at:
            title, host = host, ""
        title = title.strip()
        try:
            check_ae_title(title)
        except ValueError as exc:
            raise SecurityConfigError(f"--allow-aet {text!r}: {exc}") from None
        if not at:
            return cls(title)
        if not host:
            raise SecurityConfigError(f"--allow-aet {text!r}: a host is missing after '@'")
        return cls(title, host, frozenset(_resolve(host, text)))

    def allows(self, calling_aet: str, address: str) -> bool:
        if calling_aet != self.title:
            return False
        return self.addresses is None or _normalize(address) in self.addresses

    def __str__(self) -> str:
        return f"{self.title}@{self.host}" if self.host else self.title


def _resolve(host: str, text: str) -> set[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise SecurityConfigError(f"--allow-aet {text!r}: cannot resolve {host!r}: {exc}") from None
    return {_normalize(str(info[4][0])) for info in infos}


def _normalize(address: str) -> str:
    """An IPv4 peer seen on a dual-stack socket is ``::ffff:a.b.c.d``."""
    return address.removeprefix("::ffff:") if "." in address else address


def split_allow_list(values: Iterable[str]) -> list[str]:
    """Entries given as repeated options and/or whitespace or comma separated text.

    >>> split_allow_list(["A, B@host", "C"])
    ['A', 'B@host', 'C']
    """
    entries = []
    for value in values:
        items = value.replace(",", " ").split()
        if not items:
            raise SecurityConfigError(f"--allow-aet {value!r}: an empty entry")
        entries.extend(items)
    return entries


class AccessControl:
    """An ``EVT_REQUESTED`` handler that rejects malformed requests
    (:func:`request_problem`), calling AE titles not on the list and, with
    `called_aet`, associations addressed to another AE title: every rejection
    gets the same WARNING line (calling and called AE title, address, reason),
    also the one pynetdicom makes itself when ``--max-associations`` are
    already open (``EVT_REJECTED``).

    An empty list allows everyone (as DCMTK and Orthanc do by default).

    With `limit` (``--max-associations``), a request beyond it is rejected
    here, unless it proposes Verification alone: pynetdicom's own limit is
    :data:`ECHO_RESERVE` higher (:func:`scp.net.server.build_ae`), so that a
    health check is answered by a server that is full of senders.
    """

    def __init__(self, rules: Sequence[AllowRule], called_aet: str | None = None,
                 limit: int | None = None) -> None:
        self.rules = tuple(rules)
        self.called_aet = called_aet
        self.limit = limit
        self._ours: weakref.WeakSet = weakref.WeakSet()  #: rejected (and logged) by on_requested

    def allows(self, calling_aet: str, address: str) -> bool:
        return not self.rules or any(r.allows(calling_aet, address) for r in self.rules)

    def bindings(self) -> list[tuple]:
        return [(evt.EVT_REQUESTED, self.on_requested), (evt.EVT_REJECTED, self.on_rejected)]

    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        # ``requestor.ae_title`` is set only later, during negotiation.
        calling = str(primitive.calling_ae_title).strip()  # type: ignore[union-attr]
        called = str(primitive.called_ae_title).strip()  # type: ignore[union-attr]
        address = str(assoc.requestor.address)
        problem = request_problem(primitive)
        if problem:
            reason, rsd, detail = problem, REJECT_MALFORMED, problem
        elif not self.allows(calling, address):
            reason, rsd = "calling AE title not allowed", REJECT_CALLING_AET
            detail = f"{reason} (called '{safe(called)}')"
        elif self.called_aet is not None and called != self.called_aet:
            reason, rsd = "called AE title not ours", REJECT_CALLED_AET
            detail = f"called AE title '{safe(called)}' is not {self.called_aet}"
        elif self.limit is not None and (others := _others(assoc)) >= self.limit \
                and not _echo_only(primitive):
            reason, rsd = "association limit reached", REJECT_LIMIT
            detail = _limit_detail(others)
        else:
            return
        log.warning(
            "rejected association from '%s' (%s): %s", safe(calling), address, detail,
            extra={"event": "association_rejected", "calling_aet": calling, "called_aet": called,
                   "peer": address, "reason": reason},
        )
        self._ours.add(assoc)
        _pynetdicom.reject(assoc, *rsd)

    def on_rejected(self, event: evt.Event) -> None:
        """A rejection pynetdicom made after ``on_requested`` let the request
        through: the association limit (the only one left to it here)."""
        assoc = event.assoc
        if assoc in self._ours:
            return
        primitive = assoc.requestor.primitive
        calling = str(getattr(primitive, "calling_ae_title", "") or "").strip()
        others = _others(assoc)
        if others >= assoc.ae.maximum_associations:
            reason = "association limit reached"
            detail = _limit_detail(others, echo=self.limit is not None)
        else:  # (pynetdicom has no other reason to reject with sortscp's settings)
            reason = detail = "rejected by pynetdicom's negotiation"
        log.warning(
            "rejected association from '%s' (%s): %s", safe(calling), assoc.requestor.address, detail,
            extra={"event": "association_rejected", "calling_aet": calling, "peer": str(assoc.requestor.address),
                   "reason": reason},
        )


def _others(assoc) -> int:  # type: ignore[no-untyped-def]
    """Associations we accepted, open beside `assoc`."""
    return sum(1 for a in assoc.ae.active_associations if a.is_acceptor and a is not assoc)


def _echo_only(primitive) -> bool:  # type: ignore[no-untyped-def]
    contexts = getattr(primitive, "presentation_context_definition_list", None) or []
    return bool(contexts) and all(str(cx.abstract_syntax) == VERIFICATION_UID for cx in contexts)


def _limit_detail(others: int, echo: bool = False) -> str:
    if echo:
        return (f"{others} associations are open, the most --max-associations allows and "
                f"{ECHO_RESERVE} more for a C-ECHO alone; the sender may try again later")
    return (f"{others} associations are open, the most --max-associations allows; "
            "the sender may try again later")


#: A-ASSOCIATE-RJ: rejected-permanent, by the service user, no reason given.
REJECT_MALFORMED = (0x01, 0x01, 0x01)


def request_problem(primitive: object) -> str | None:
    """What makes an A-ASSOCIATE request unusable (None: nothing): no
    presentation context, or one with an empty abstract syntax or without a
    transfer syntax. pynetdicom accepts such a request (an empty abstract syntax
    even gets its context accepted), leaving an association nothing can be
    sent on."""
    contexts = getattr(primitive, "presentation_context_definition_list", None) or []
    if not contexts:
        return "no presentation context proposed"
    for cx in contexts:
        if not str(cx.abstract_syntax or "").strip("\0 "):
            return f"presentation context {cx.context_id} has an empty abstract syntax"
        if not [ts for ts in cx.transfer_syntax if str(ts).strip("\0 ")]:
            return f"presentation context {cx.context_id} proposes no transfer syntax"
    return None


