"""Stateless DHCPv6 (RFC 8415 §6.1): an Information-request gets a Reply with DNS and boot data.

Addresses come from SLAAC (the router advertisement in :mod:`appliance.nat.ipv6`);
what a guest or its firmware may still ask of a DHCPv6 server is the rest of
its configuration. As libslirp (QEMU's ``-netdev user``), only the
Information-request (type 11, RFC 8415 §18.2.6) is answered, sent to
All_DHCP_Relay_Agents_and_Servers (ff02::1:2, §7.1) or to the router's own
address, port 547; every other message type (Solicit, Request, Relay-forward…)
is counted as unsupported and left unanswered, so a stateful client finds no
server here, as with libslirp. The Reply (type 7, §18.3.6) comes from the
router address to the client's address and port, with the same transaction
id, and carries:

- Server Identifier (option 2, §21.3): a DUID-LL from the router's MAC (§11.4);
  libslirp sends none, which §18.3 requires;
- Client Identifier (option 1, §21.2): the client's, echoed when it sent one;
- for what the Option Request option (6, §21.7) names, and as libslirp only
  then: DNS Recursive Name Server (23, RFC 3646 §3), the stack's IPv6 DNS
  address, left out under ``restrict=on`` as the DHCPv4 server leaves out its
  router and DNS options; Domain Search List (24, RFC 3646 §4; libslirp has
  none), the ``dnssearch=`` names, else ``domainname=``, uncompressed as
  RFC 8415 §10 requires; Boot File URL (59, RFC 5970 §3.1),
  ``tftp://[router]/bootfile``, when both ``tftp=`` and ``bootfile=`` are set
  (libslirp sends it whenever asked, with "(null)" for a missing file name).

Like DHCPv4 it is a local service that ``restrict=on`` keeps (libslirp drops
every UDPv6 datagram of a restricted guest, DHCPv6 and DNS included).

The guest is hostile. A request is dropped, counted in ``dhcp6_bad``, when an
option runs past the end of the message or leaves 1 to 3 stray bytes, when it
carries an IA option (IA_NA, IA_TA, IA_PD, or a bare IA Address as libslirp
checks; RFC 8415 §16.12), two Client Identifiers, one longer than 256 bytes
(libslirp's bound), or an Option Request option of odd length (as libslirp);
one naming another server's DUID is not for us (§16.12).
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from appliance.nat.config import domain_labels, raw_bytes
from appliance.nat.frames import special_mac
from appliance.nat.ipv6 import ALL_DHCP_SERVERS, LINK_LOCAL_ROUTER

if TYPE_CHECKING:
    from appliance.nat.stack import UserNetwork

log = logging.getLogger(__name__)

CLIENT_PORT = 546
SERVER_PORT = 547

REPLY = 7
INFORMATION_REQUEST = 11

OPT_CLIENTID = 1
OPT_SERVERID = 2
OPT_IA_NA = 3
OPT_IA_TA = 4
OPT_IAADDR = 5
OPT_ORO = 6
OPT_DNS_SERVERS = 23
OPT_DOMAIN_LIST = 24
OPT_IA_PD = 25
OPT_BOOTFILE_URL = 59
_IA_OPTIONS = frozenset({OPT_IA_NA, OPT_IA_TA, OPT_IAADDR, OPT_IA_PD})
MAX_CLIENT_ID = 256  # libslirp's bound; a DUID is at most 130 bytes (RFC 8415 §11.1)
DUID_LL = 3
HWTYPE_ETHERNET = 1
_OPT = struct.Struct("!HH")


def option(code: int, value: bytes) -> bytes:
    """One option as RFC 8415 §21.1 lays it out: code, length, value."""
    return _OPT.pack(code, len(value)) + value


def encode_domains(names: tuple[str, ...] | list[str]) -> bytes:
    """Domain names as RFC 8415 §10 wants them in options: RFC 1035 §3.1 labels, uncompressed.

    A name with an empty label ("a..b", "."), a label over 63 bytes or more than
    255 bytes in all is left out with a warning, as the DHCPv4 search list does.
    """
    out = bytearray()
    for name in names:
        labels = domain_labels(name)
        if labels is None:
            log.warning("'%s' is not a domain name; left out of the DHCPv6 search list", name)
            continue
        out += b"".join(bytes([len(lab)]) + lab for lab in labels) + b"\0"
    return bytes(out)


def options(data: bytes) -> list[tuple[int, bytes]] | None:
    """The options of a client message after its 4-byte header, or None if one runs past the end."""
    out = []
    i, n = 0, len(data)
    while i < n:
        if i + 4 > n:
            return None
        code, length = _OPT.unpack_from(data, i)
        if i + 4 + length > n:
            return None
        out.append((code, data[i + 4 : i + 4 + length]))
        i += 4 + length
    return out


class Dhcp6Server:
    """Answers Information-requests for one :class:`UserNetwork` with IPv6 on."""

    def __init__(self, net: UserNetwork) -> None:
        assert net.ipv6 is not None
        self.net = net
        cfg = net.config
        self.router = net.ipv6.router
        # Where a client may send: the multicast group, and the router (unicast, as libslirp
        # takes it at its host address; its link-local address too).
        self.addresses = frozenset({ALL_DHCP_SERVERS, self.router, LINK_LOCAL_ROUTER})
        # The router's own MAC, the one its Replies come from (special_mac).
        self.duid = struct.pack("!HH6s", DUID_LL, HWTYPE_ETHERNET, special_mac(self.router))
        self._server_id = option(OPT_SERVERID, self.duid)
        self._dns = None if cfg.restrict else option(OPT_DNS_SERVERS, cfg.ipv6_dns.packed)
        search = encode_domains(cfg.dnssearch or ((cfg.domainname,) if cfg.domainname else ()))
        self._search = option(OPT_DOMAIN_LIST, search) if 0 < len(search) <= 0xFFFF else None
        self._boot_url = None
        if cfg.tftp and cfg.bootfile:
            url = b"tftp://[%s]/" % str(cfg.ipv6_host).encode() + raw_bytes(cfg.bootfile)
            self._boot_url = option(OPT_BOOTFILE_URL, url)

    def input(self, src: bytes, sport: int, payload: bytes | memoryview) -> None:
        """One UDP datagram from the guest to port 547 of ``addresses``."""
        st = self.net.stats
        data = bytes(payload)  # copied out once: everything below reads this copy
        if len(data) < 4:
            st.dhcp6_bad += 1
            return
        if data[0] != INFORMATION_REQUEST:
            st.unsupported += 1  # stateless only, as libslirp: no Advertise, no leases
            return
        opts = options(data[4:])
        if opts is None:
            st.dhcp6_bad += 1
            return
        client_id: bytes | None = None
        wanted: set[int] = set()
        for code, value in opts:
            if code in _IA_OPTIONS:
                st.dhcp6_bad += 1  # RFC 8415 §16.12: an Information-request asks for no addresses
                return
            if code == OPT_SERVERID and value != self.duid:
                st.not_for_us += 1  # addressed to another server (§16.12)
                return
            if code == OPT_CLIENTID:
                if client_id is not None or len(value) > MAX_CLIENT_ID:
                    st.dhcp6_bad += 1
                    return
                client_id = value
            elif code == OPT_ORO:
                if len(value) & 1:
                    st.dhcp6_bad += 1
                    return
                wanted.update(struct.unpack(f"!{len(value) // 2}H", value))
        reply = bytearray(data[:4])
        reply[0] = REPLY
        reply += self._server_id
        if client_id is not None:
            reply += option(OPT_CLIENTID, client_id)
        for code, opt in ((OPT_DNS_SERVERS, self._dns), (OPT_DOMAIN_LIST, self._search),
                          (OPT_BOOTFILE_URL, self._boot_url)):  # fmt: skip
            if opt is not None and code in wanted:
                reply += opt
        if self.net.emit_udp(src, sport, self.router, SERVER_PORT, reply):
            st.dhcp6_replies += 1
