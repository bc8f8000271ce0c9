/* What the guest learns at boot: the PVH memory map and the ACPI tables
 * (MADT for CPUs, FADT + DSDT for power-off and reset), and how it acts on them.
 *
 * ACPI references are to ACPI 6.5: RSDP 5.2.5, XSDT 5.2.8, FADT 5.2.9 (fields
 * by offset, table 5.9), MADT 5.2.12, sleep control register 4.8.3.7, \_S5
 * 7.4.2. The tables come from the VMM: they are checked (signature, length,
 * checksum) before use, and addresses must lie inside the identity map. */
#include "testguest.h"

struct machine M;

#define HVM_START_MAGIC 0x336ec578
#define MAP_LIMIT (8ull << 30)     /* what entry.S identity-maps */

struct hvm_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr;
    uint64_t memmap_paddr;
    uint32_t memmap_entries, reserved;
};

struct hvm_memmap_entry {
    uint64_t addr, size;
    uint32_t type, reserved;
};

void memmap_init(uint64_t pa)
{
    M.start_info_pa = pa;
    if (!pa || pa >= MAP_LIMIT)
        return;
    const struct hvm_start_info *si = (const void *)(uintptr_t)pa;
    if (si->magic != HVM_START_MAGIC)
        return;
    M.rsdp_pa = si->rsdp_paddr;
    if (si->version >= 1 && si->memmap_paddr && si->memmap_paddr < MAP_LIMIT) {
        const struct hvm_memmap_entry *e = (const void *)(uintptr_t)si->memmap_paddr;
        for (uint32_t i = 0; i < si->memmap_entries && M.nmem < ARRAY_SIZE(M.mem); i++) {
            M.mem[M.nmem++] = (struct memrange){e[i].addr, e[i].size, e[i].type};
            if (e[i].type == 1)
                M.ram_bytes += e[i].size;
        }
    }
}

static uint8_t sum8(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint8_t s = 0;
    while (n--)
        s += *b++;
    return s;
}

static uint64_t scan_rsdp(uint64_t start, uint64_t end)
{
    for (uint64_t a = start; a + 20 <= end; a += 16)
        if (!memcmp((const void *)(uintptr_t)a, "RSD PTR ", 8) && sum8((const void *)(uintptr_t)a, 20) == 0)
            return a;
    return 0;
}

/* A system description table at pa, or NULL if it is not one we can trust. */
static const uint8_t *sdt(uint64_t pa, const char *sig)
{
    if (!pa || pa + 36 > MAP_LIMIT)
        return NULL;
    const uint8_t *t = (const void *)(uintptr_t)pa;
    uint32_t len = *(const uint32_t *)(t + 4);
    if (len < 36 || pa + len > MAP_LIMIT || len > (1u << 20))
        return NULL;
    if (sig && memcmp(t, sig, 4))
        return NULL;
    if (sum8(t, len) != 0)
        return NULL;
    return t;
}

static uint32_t u32at(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t u64at(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static void parse_madt(const uint8_t *t)
{
    uint32_t len = u32at(t + 4);
    if (len < 44)
        return;
    M.lapic_base = u32at(t + 36);
    for (uint32_t off = 44; off + 2 <= len;) {
        uint8_t type = t[off], elen = t[off + 1];
        if (elen < 2 || off + elen > len)
            break;
        const uint8_t *e = t + off;
        if (type == 0 && elen >= 8 && (u32at(e + 4) & 1)) {
            if (M.ncpus < MAX_CPUS)
                M.apic_ids[M.ncpus] = e[3];
            M.ncpus++;
        } else if (type == 9 && elen >= 16 && (u32at(e + 8) & 1)) {
            if (M.ncpus < MAX_CPUS)
                M.apic_ids[M.ncpus] = u32at(e + 4);
            M.ncpus++;
        } else if (type == 5 && elen >= 12) {
            M.lapic_base = u64at(e + 4);
        }
        off += elen;
    }
}

/* Finds Name(_S5_, Package(){SLP_TYPa, ...}) in AML and returns SLP_TYPa. */
static int find_s5(const uint8_t *aml, uint32_t len, uint8_t *typ)
{
    for (uint32_t i = 36; i + 8 < len; i++) {
        if (memcmp(aml + i, "_S5_", 4) || aml[i + 4] != 0x12)   /* PackageOp */
            continue;
        uint32_t p = i + 5;
        p += (uint32_t)(aml[p] >> 6) + 1;                       /* PkgLength */
        p += 1;                                                 /* NumElements */
        if (p + 2 > len)
            return 0;
        switch (aml[p]) {
        case 0x0A: *typ = aml[p + 1]; return 1;                 /* BytePrefix */
        case 0x00: *typ = 0; return 1;                          /* ZeroOp */
        case 0x01: *typ = 1; return 1;                          /* OneOp */
        default: if (aml[p] < 0x0A) { *typ = aml[p]; return 1; } return 0;
        }
    }
    return 0;
}

/* A host bridge's _CBA (ACPI 6.5 §6.5.12), the ECAM base for firmware that
 * has no MCFG (QEMU microvm with pcie=on): either Name(_CBA, base) or a
 * Method(_CBA) whose body is just Return(base). */
static uint64_t cba_base;

static void find_cba(const uint8_t *aml, uint32_t len)
{
    for (uint32_t i = 36; i + 13 < len; i++) {
        if (memcmp(aml + i, "_CBA", 4))
            continue;
        const uint8_t *v = aml + i + 4;
        if (v[1] == 0xA4)                                       /* MethodFlags, ReturnOp */
            v += 2;
        if (v[0] == 0x0C)                                       /* DWordPrefix */
            cba_base = u32at(v + 1);
        else if (v[0] == 0x0E)                                  /* QWordPrefix */
            cba_base = u64at(v + 1);
        if (cba_base)
            return;
    }
}

static void gas(const uint8_t *g, uint8_t *space, uint8_t *width, uint64_t *addr)
{
    *space = g[0];
    *width = g[1];
    *addr = u64at(g + 4);
}

static void parse_fadt(const uint8_t *t)
{
    uint32_t len = u32at(t + 4);
    if (len >= 68)
        M.pm1a_cnt = u32at(t + 64);
    uint32_t flags = len >= 116 ? u32at(t + 112) : 0;
    M.hw_reduced = !!(flags & (1u << 20));
    if (len >= 129 && (flags & (1u << 10))) {
        M.reset_supported = 1;
        gas(t + 116, &M.reset_reg.space, &M.reset_reg.width, &M.reset_reg.addr);
        M.reset_value = t[128];
    }
    if (len >= 184) {
        uint8_t space, width;
        uint64_t addr;
        gas(t + 172, &space, &width, &addr);
        if (addr && space == 1 && addr < 0x10000)
            M.pm1a_cnt = (uint32_t)addr;
    }
    if (len >= 256)
        gas(t + 244, &M.sleep_ctl.space, &M.sleep_ctl.width, &M.sleep_ctl.addr);
    uint64_t dsdt_pa = len >= 148 ? u64at(t + 140) : 0;
    if (!dsdt_pa && len >= 44)
        dsdt_pa = u32at(t + 40);
    const uint8_t *dsdt = sdt(dsdt_pa, "DSDT");
    if (dsdt) {
        M.s5_found = find_s5(dsdt, u32at(dsdt + 4), &M.s5_typ);
        find_cba(dsdt, u32at(dsdt + 4));
    }
}

/* MCFG (PCI Firmware 3.2 §4.1.2): 8 reserved bytes, then 16-byte entries. */
static void parse_mcfg(const uint8_t *t)
{
    uint32_t len = u32at(t + 4);
    for (uint32_t off = 44; off + 16 <= len; off += 16) {
        uint64_t base = u64at(t + off);
        uint16_t seg = (uint16_t)(t[off + 8] | t[off + 9] << 8);
        if (seg == 0 && base && base < MAP_LIMIT && !M.ecam_base) {
            M.ecam_base = base;
            M.ecam_bus_start = t[off + 10];
            M.ecam_bus_end = t[off + 11];
        }
    }
}

void acpi_init(void)
{
    uint64_t rsdp = M.rsdp_pa;
    if (!rsdp || rsdp >= MAP_LIMIT || memcmp((const void *)(uintptr_t)rsdp, "RSD PTR ", 8)) {
        uintptr_t bda = 0x40E;  /* BIOS data area: EBDA segment */
        __asm__("" : "+r"(bda));
        uint64_t ebda = (uint64_t)(*(volatile uint16_t *)bda) << 4;
        rsdp = 0;
        if (ebda >= 0x80000 && ebda < 0xA0000)
            rsdp = scan_rsdp(ebda, ebda + 1024);
        if (!rsdp)
            rsdp = scan_rsdp(0xE0000, 0x100000);
    }
    M.rsdp_pa = rsdp;
    if (!rsdp)
        return;
    const uint8_t *r = (const void *)(uintptr_t)rsdp;
    if (sum8(r, 20) != 0)
        return;
    const uint8_t *root = NULL;
    int entry_size = 4;
    if (r[15] >= 2 && u32at(r + 20) >= 36 && sum8(r, 36) == 0 && (root = sdt(u64at(r + 24), "XSDT")))
        entry_size = 8;
    else
        root = sdt(u32at(r + 16), "RSDT");
    if (!root)
        return;
    M.acpi_ok = 1;
    uint32_t n = (u32at(root + 4) - 36) / (uint32_t)entry_size;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *ep = root + 36 + i * (uint32_t)entry_size;
        uint64_t pa = entry_size == 8 ? u64at(ep) : u32at(ep);
        const uint8_t *t = sdt(pa, NULL);
        if (!t)
            continue;
        if (!memcmp(t, "APIC", 4))
            parse_madt(t);
        else if (!memcmp(t, "FACP", 4))
            parse_fadt(t);
        else if (!memcmp(t, "MCFG", 4))
            parse_mcfg(t);
    }
    if (!M.ecam_base && cba_base && cba_base < MAP_LIMIT) {
        M.ecam_base = cba_base;
        M.ecam_bus_start = 0;
        M.ecam_bus_end = 255;
    }
}

static void gas_write8(uint8_t space, uint64_t addr, uint8_t v)
{
    if (space == 1 && addr < 0x10000)
        outb((uint16_t)addr, v);
    else if (space == 0 && addr && addr < MAP_LIMIT)
        mmio_write8(addr, v);
}

void acpi_poweroff(void)
{
    uint8_t typ = M.s5_found ? M.s5_typ : 5;
    if (M.sleep_ctl.addr) {
        /* Hardware-reduced ACPI: SLP_TYPx in bits 2-4, SLP_EN is bit 5. */
        gas_write8(M.sleep_ctl.space, M.sleep_ctl.addr, (uint8_t)(((typ & 7) << 2) | 0x20));
    }
    if (M.pm1a_cnt) {
        /* PM1 control: SLP_TYPx in bits 10-12, SLP_EN is bit 13. */
        outw((uint16_t)M.pm1a_cnt, (uint16_t)(((typ & 7) << 10) | (1 << 13)));
    }
}

void machine_reset(void)
{
    if (M.reset_supported)
        gas_write8(M.reset_reg.space, M.reset_reg.addr, M.reset_value);
    outb(0xCF9, 0x06);                 /* PCI reset control: full reset */
    for (int i = 0; i < 100000 && (inb(0x64) & 0x02); i++)
        cpu_relax();
    outb(0x64, 0xFE);                  /* i8042: pulse the reset line */
    /* No IDT: an exception becomes a triple fault, which resets (or ends) the VM. */
    __asm__ volatile("ud2");
    for (;;)
        ;
}

/* Hands out guest RAM above the image for large buffers, so they are neither
 * part of the ELF (which every loader zero-fills) nor touched at boot. Bump
 * allocation inside a RAM range of the memory map, below the identity map's end. */
extern char __image_end[];
static uint64_t heap_next;

void *ram_alloc(uint64_t size, uint64_t align)
{
    if (!heap_next)
        heap_next = (uint64_t)(uintptr_t)__image_end;
    for (unsigned i = 0; i < M.nmem; i++) {
        const struct memrange *r = &M.mem[i];
        if (r->type != 1)
            continue;
        uint64_t start = heap_next > r->addr ? heap_next : r->addr;
        start = (start + align - 1) & ~(align - 1);
        uint64_t end = r->addr + r->size;
        if (end > MAP_LIMIT)
            end = MAP_LIMIT;
        if (start >= heap_next && start + size <= end) {
            heap_next = start + size;
            return (void *)(uintptr_t)start;
        }
    }
    return NULL;
}
