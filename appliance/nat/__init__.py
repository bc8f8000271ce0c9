"""User-mode networking: ARP, IPv4, ICMP, UDP, a TCP endpoint, DHCP, DNS, port forwards.

``UserNetwork(UserNetConfig.parse(opts))`` is a :class:`~appliance.net.backend.FrameBackend`
that plays the whole outside world for one guest NIC, like QEMU's libslirp:
the guest sees a router at 10.0.2.2 and its traffic leaves through ordinary
host sockets, so no root, tap or bridge is needed.
"""

from appliance.nat.config import HostForward, UserNetConfig
from appliance.nat.errors import NatError
from appliance.nat.stack import UserNetwork

__all__ = ["HostForward", "NatError", "UserNetConfig", "UserNetwork"]
