"""virtio-net numbers (virtio 1.2 §5.1): feature bits, header, control queue."""

from __future__ import annotations

import struct

# §5.1.3 feature bits.
F_CSUM = 0
F_GUEST_CSUM = 1
F_CTRL_GUEST_OFFLOADS = 2
F_MTU = 3
F_MAC = 5
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_GUEST_UFO = 10
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_HOST_UFO = 14
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_CTRL_RX = 18
F_CTRL_VLAN = 19
F_GUEST_ANNOUNCE = 21
F_MQ = 22
F_CTRL_MAC_ADDR = 23
F_SPEED_DUPLEX = 63

# §5.1.4 speed (Mbit/s) and duplex fields, with VIRTIO_NET_F_SPEED_DUPLEX.
SPEED_UNKNOWN = 0xFFFFFFFF
DUPLEX_HALF = 0x00
DUPLEX_FULL = 0x01
DUPLEX_UNKNOWN = 0xFF

# §5.1.4 status field.
S_LINK_UP = 1
S_ANNOUNCE = 2

# §5.1.6 struct virtio_net_hdr (VERSION_1 layout always has num_buffers).
HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
HDR_LEN = HDR.size  # 12
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

# §5.1.6.5 control virtqueue.
CTRL_OK = 0
CTRL_ERR = 1
CTRL_RX = 0
CTRL_RX_PROMISC = 0
CTRL_RX_ALLMULTI = 1
CTRL_RX_ALLUNI = 2
CTRL_RX_NOMULTI = 3
CTRL_RX_NOUNI = 4
CTRL_RX_NOBCAST = 5
CTRL_MAC = 1
CTRL_MAC_TABLE_SET = 0
CTRL_MAC_ADDR_SET = 1
CTRL_VLAN = 2
CTRL_ANNOUNCE = 3
CTRL_ANNOUNCE_ACK = 0
CTRL_MQ = 4
CTRL_MQ_VQ_PAIRS_SET = 0
CTRL_MQ_VQ_PAIRS_MIN = 1
CTRL_MQ_VQ_PAIRS_MAX = 0x8000
CTRL_GUEST_OFFLOADS = 5
CTRL_GUEST_OFFLOADS_SET = 0

# Largest frame a guest with GUEST_TSO may be handed: a 64 KiB GSO frame
# plus Ethernet and VLAN headers.
MAX_GSO_FRAME = 65535 + 14 + 4
