"""PCI bus 0 for our own vCPUs: config space, BARs, capabilities, MSI-X.

The public pieces: :class:`~appliance.pci.bus.PciBus` (register it on the PIO
bus at 0xCF8, size 8, and ``add()`` devices), :class:`~appliance.pci.device.PciDevice`
(the base of every function), :class:`~appliance.pci.msix.Msix`,
:func:`~appliance.pci.allocator.parse_pci_address` and
:func:`~appliance.pci.allocator.plan_slots` for ``addr=``, and the
:class:`~appliance.pci.irq.MsiPlatform` protocol the KVM ``Vm`` satisfies.
"""

from appliance.pci.allocator import PciAddress, parse_pci_address, plan_slots
from appliance.pci.bus import PciBus
from appliance.pci.device import PciDevice
from appliance.pci.errors import BarSpaceError, PciError, SlotError

__all__ = [
    "BarSpaceError",
    "PciAddress",
    "PciBus",
    "PciDevice",
    "PciError",
    "SlotError",
    "parse_pci_address",
    "plan_slots",
]
