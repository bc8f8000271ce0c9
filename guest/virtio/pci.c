/* PCI configuration space through the type 1 mechanism (PCI Local Bus 3.0
 * §3.2.2.3.2): address to 0xCF8, data at 0xCFC + (offset & 3). */
#include "virtio.h"

static uint32_t cfg_addr(unsigned bus, unsigned dev, unsigned fn, unsigned off)
{
    return 0x80000000u | (bus << 16) | (dev << 11) | (fn << 8) | (off & 0xFC);
}

uint32_t pci_read32(unsigned bus, unsigned dev, unsigned fn, unsigned off)
{
    outl(0xCF8, cfg_addr(bus, dev, fn, off));
    return inl(0xCFC);
}

uint16_t pci_read16(unsigned bus, unsigned dev, unsigned fn, unsigned off)
{
    outl(0xCF8, cfg_addr(bus, dev, fn, off));
    return inw((uint16_t)(0xCFC + (off & 2)));
}

uint8_t pci_read8(unsigned bus, unsigned dev, unsigned fn, unsigned off)
{
    outl(0xCF8, cfg_addr(bus, dev, fn, off));
    return inb((uint16_t)(0xCFC + (off & 3)));
}

void pci_write32(unsigned bus, unsigned dev, unsigned fn, unsigned off, uint32_t v)
{
    outl(0xCF8, cfg_addr(bus, dev, fn, off));
    outl(0xCFC, v);
}

void pci_write16(unsigned bus, unsigned dev, unsigned fn, unsigned off, uint16_t v)
{
    outl(0xCF8, cfg_addr(bus, dev, fn, off));
    outw((uint16_t)(0xCFC + (off & 2)), v);
}
