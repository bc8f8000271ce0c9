/* The test guest's shared declarations: types, port and MMIO access, the
 * console, the boot facts every command may report, and the command table. */
#ifndef TESTGUEST_H
#define TESTGUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define NORETURN __attribute__((noreturn))

/* ---- port and memory-mapped I/O (CPL 3 with IOPL 3 may use in/out) ---- */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline uint32_t mmio_read32(uint64_t addr) { return *(volatile uint32_t *)(uintptr_t)addr; }
static inline void mmio_write32(uint64_t addr, uint32_t v) { *(volatile uint32_t *)(uintptr_t)addr = v; }
static inline uint8_t mmio_read8(uint64_t addr) { return *(volatile uint8_t *)(uintptr_t)addr; }
static inline void mmio_write8(uint64_t addr, uint8_t v) { *(volatile uint8_t *)(uintptr_t)addr = v; }
static inline uint16_t mmio_read16(uint64_t addr) { return *(volatile uint16_t *)(uintptr_t)addr; }
static inline void mmio_write16(uint64_t addr, uint16_t v) { *(volatile uint16_t *)(uintptr_t)addr = v; }
static inline uint64_t mmio_read64(uint64_t addr) { return *(volatile uint64_t *)(uintptr_t)addr; }
static inline void mmio_write64(uint64_t addr, uint64_t v) { *(volatile uint64_t *)(uintptr_t)addr = v; }

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
#define barrier() __asm__ volatile("" ::: "memory")
/* x86 is TSO: stores are not reordered with stores nor loads with loads, so a
 * compiler barrier orders ring updates; mfence orders a store before a load. */
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

/* ---- small libc ---- */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
/* Parses a decimal or 0x-hex unsigned number; returns 0 on success. */
int parse_u64(const char *s, uint64_t *out);
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
uint32_t crc32(uint32_t crc, const void *data, size_t n);

/* ---- latency statistics (src/stats.c; free of the rest, so the host's
 * tests compile it too) ---- */
void sort_u32(uint32_t *a, size_t n);
/* Up to `cap` samples are all kept; past that, reservoir sampling keeps a
 * uniform sample of the whole run. n, sum and max count every sample. */
struct latency {
    uint32_t *samples;
    uint64_t cap, n, kept, sum, max, rng;
};
void latency_init(struct latency *l, uint32_t *buf, uint64_t cap);
void latency_add(struct latency *l, uint64_t value);
/* Sorts the kept samples; call once, before latency_percentile. */
void latency_finish(struct latency *l);
/* Nearest rank: the smallest kept value with at least per_mille/1000 of the
 * kept samples at or below it; 0 if there are none. */
uint32_t latency_percentile(const struct latency *l, unsigned per_mille);
uint64_t latency_mean(const struct latency *l);

/* ---- console (16550 UART on COM1, polled) ---- */
void uart_init(void);
/* Prints one formatted line (a newline is added) atomically across CPUs. */
void println(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Reads one line into buf (without the newline); returns its length. */
size_t uart_readline(char *buf, size_t size);

typedef struct { volatile uint32_t locked; } spinlock_t;
void spin_lock(spinlock_t *l);
void spin_unlock(spinlock_t *l);

/* ---- time (TSC calibrated against the PIT) and idle work ---- */
uint64_t tsc_khz(void);
int tsc_khz_measured(void);
uint64_t now_us(void);
/* Functions run while the command loop waits for a line (e.g. answering ARP). */
void idle_hook_add(void (*fn)(void));
void idle_poll(void);

/* ---- boot facts ---- */
struct memrange { uint64_t addr, size; uint32_t type; };

struct machine {
    uint64_t start_info_pa;
    uint64_t rsdp_pa;
    uint64_t ram_bytes;           /* sum of RAM ranges in the memory map */
    unsigned nmem;
    struct memrange mem[32];
    /* ACPI */
    int acpi_ok;
    uint64_t lapic_base;
    unsigned ncpus;               /* enabled local APICs in the MADT */
    uint32_t apic_ids[MAX_CPUS];
    int hw_reduced;
    uint32_t pm1a_cnt;            /* I/O port, 0 if none */
    struct { uint8_t space; uint8_t width; uint64_t addr; } sleep_ctl, reset_reg;
    uint8_t reset_value;
    int reset_supported;
    int s5_found;
    uint8_t s5_typ;
    /* PCI Express ECAM from the MCFG (segment 0), 0 if none: then 0xCF8/0xCFC. */
    uint64_t ecam_base;
    uint8_t ecam_bus_start, ecam_bus_end;
    /* SMP */
    unsigned cpus_up;             /* BSP plus APs that reported alive */
    uint32_t bsp_apic_id;
};
extern struct machine M;

void memmap_init(uint64_t start_info_pa);
void acpi_init(void);
/* RAM above the image from the memory map (never freed); NULL if none fits. */
void *ram_alloc(uint64_t size, uint64_t align);
void acpi_poweroff(void);
void machine_reset(void) NORETURN;
void smp_init(void);

/* ---- command table: each command file adds entries with COMMAND() ---- */
struct command {
    const char *name;
    const char *help;
    /* argv[0] is the command name; rest is the text after it. */
    void (*run)(int argc, char **argv, const char *rest);
};
#define COMMAND(cname, fn, helptext)                                                     \
    static const struct command __cmd_##fn __attribute__((section(".commands"), used,    \
                                                           aligned(8))) = {cname, helptext, fn}
extern const struct command __commands_start[], __commands_end[];

#endif
