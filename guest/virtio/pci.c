/* PCI configuration space: the type 1 mechanism (PCI Local Bus 3.0
 * §3.2.2.3.2: address to 0xCF8, data at 0xCFC + (offset & 3)) where it exists,
 * else memory-mapped ECAM from the MCFG or the host bridge's _CBA (PCI
 * Express Base 5.0 §7.2.2: bus << 20 | device << 15 | function << 12). */
#include "virtio.h"

/* 1 if the type 1 mechanism answers: its address register reads back what
 * was written. Preferred when present (our VMM, q35), so ECAM is only used
 * where nothing decodes 0xCF8 (microvm). */
static int cf8_present(void)
{
    static int present = -1;
    if (present < 0) {
        outl(0xCF8, 0x80000000u);
        present = inl(0xCF8) == 0x80000000u;
    }
    return present;
}

static uint64_t ecam(unsigned bus, unsigned dev, unsigned fn, unsigned off)
{
    if (!M.ecam_base || bus < M.ecam_bus_start || bus > M.ecam_bus_end || cf8_present())
        return 0;
    return M.ecam_base + ((uint64_t)(bus - M.ecam_bus_start) << 20) + ((uint64_t)dev << 15) +
           ((uint64_t)fn << 12) + (off & 0xFFF);
}

static uint32_t cfg_addr(unsigned bus, unsigned dev, unsigned fn, unsigned off)
{
    return 0x80000000u | (bus << 16) | (dev << 11) | (fn << 8) | (off & 0xFC);
}

uint32_t pci_read32(unsigned bus, unsigned dev, unsigned fn, unsigned off)
{
    uint64_t a = ecam(bus, dev, fn, off & ~3u);
    if (a)
        return mmio_read32(a);
    outl(0xCF8, cfg_addr(bus, dev, fn, off));
    return inl(0xCFC);
}

uint16_t pci_read16(unsigned bus, unsigned dev, unsigned fn, unsigned off)
{
    uint64_t a = ecam(bus, dev, fn, off & ~1u);
    if (a)
        return mmio_read16(a);
    outl(0xCF8, cfg_addr(bus, dev, fn, off));
    return inw((uint16_t)(0xCFC + (off & 2)));
}

uint8_t pci_read8(unsigned bus, unsigned dev, unsigned fn, unsigned off)
{
    uint64_t a = ecam(bus, dev, fn, off);
    if (a)
        return mmio_read8(a);
    outl(0xCF8, cfg_addr(bus, dev, fn, off));
    return inb((uint16_t)(0xCFC + (off & 3)));
}

void pci_write32(unsigned bus, unsigned dev, unsigned fn, unsigned off, uint32_t v)
{
    uint64_t a = ecam(bus, dev, fn, off & ~3u);
    if (a) {
        mmio_write32(a, v);
        return;
    }
    outl(0xCF8, cfg_addr(bus, dev, fn, off));
    outl(0xCFC, v);
}

void pci_write16(unsigned bus, unsigned dev, unsigned fn, unsigned off, uint16_t v)
{
    uint64_t a = ecam(bus, dev, fn, off & ~1u);
    if (a) {
        mmio_write16(a, v);
        return;
    }
    outl(0xCF8, cfg_addr(bus, dev, fn, off));
    outw((uint16_t)(0xCFC + (off & 2)), v);
}

/* Memory BARs nobody assigned (no firmware, e.g. QEMU microvm,pcie=on) get
 * addresses from the 32-bit window [0xC0000000, 0xE0000000): our layout's
 * PCI window and QEMU microvm's PCIe window both start there; QEMU's ECAM
 * follows at 0xE0000000. Assigned BARs are left alone. */
#define WINDOW_START 0xC0000000ull
#define WINDOW_END   0xE0000000ull
static uint64_t window_next = WINDOW_START;

void pci_assign_bars(unsigned bus, unsigned dev, unsigned fn)
{
    uint16_t cmd = pci_read16(bus, dev, fn, 0x04);
    pci_write16(bus, dev, fn, 0x04, (uint16_t)(cmd & ~0x03));   /* decode off while sizing */
    for (unsigned bar = 0; bar < 6; bar++) {
        unsigned off = 0x10 + 4 * bar;
        uint32_t lo = pci_read32(bus, dev, fn, off);
        if (lo & 1)
            continue;                                         /* I/O BAR */
        int is64 = ((lo >> 1) & 3) == 2 && bar < 5;
        uint32_t hi = is64 ? pci_read32(bus, dev, fn, off + 4) : 0;
        pci_write32(bus, dev, fn, off, 0xFFFFFFFF);
        uint64_t mask = pci_read32(bus, dev, fn, off) & ~0xFull;
        if (is64) {
            pci_write32(bus, dev, fn, off + 4, 0xFFFFFFFF);
            mask |= (uint64_t)pci_read32(bus, dev, fn, off + 4) << 32;
        } else {
            mask |= 0xFFFFFFFF00000000ull;
        }
        uint64_t size = mask ? ~mask + 1 : 0;
        uint64_t cur = (lo & ~0xFull) | ((uint64_t)hi << 32);
        if (!size || cur) {
            pci_write32(bus, dev, fn, off, lo);                   /* absent or already placed */
            if (is64)
                pci_write32(bus, dev, fn, off + 4, hi);
        } else {
            uint64_t addr = (window_next + size - 1) & ~(size - 1);
            if (addr + size <= WINDOW_END) {
                window_next = addr + size;
                pci_write32(bus, dev, fn, off, (uint32_t)addr | (lo & 0xF));
                if (is64)
                    pci_write32(bus, dev, fn, off + 4, (uint32_t)(addr >> 32));
            } else {
                pci_write32(bus, dev, fn, off, lo);
                if (is64)
                    pci_write32(bus, dev, fn, off + 4, hi);
            }
        }
        if (is64)
            bar++;
    }
    pci_write16(bus, dev, fn, 0x04, (uint16_t)(cmd | 0x02));
}
