/* Application processors: INIT-SIPI-SIPI through the local APIC (Intel SDM
 * vol. 3A 9.4.4, "MP Initialization Example"), one AP at a time so that AP
 * numbers follow MADT order. The AP's path is entry.S's trampoline: real mode
 * -> protected mode -> long mode -> ap_main() at CPL 0, then `hlt` with
 * interrupts off, which costs the host nothing (see entry.S for why APs stay
 * at CPL 0).
 *
 * KVM's local APIC needs none of the SDM's 10 ms / 200 us delays; we send the
 * second SIPI only if the AP has not reported after a while. Time is counted
 * in TSC cycles because no timer is calibrated; the bounds are loose. */
#include "testguest.h"

#define LAPIC_ID      0x020
#define LAPIC_ICR_LO  0x300
#define LAPIC_ICR_HI  0x310
#define ICR_BUSY      (1u << 12)
#define ICR_INIT      0x00004500u    /* INIT, level assert */
#define ICR_STARTUP   0x00004600u    /* Start-up, vector = page number */

extern char ap_trampoline[], ap_trampoline_end[];
extern char stacks[], kstacks[];
extern volatile uint8_t gdt_ap_tss[16];
extern volatile uint64_t ap_boot_stack;
extern volatile uint32_t ap_boot_index;

static volatile uint32_t ap_alive[MAX_CPUS];

static void lapic_wait_idle(void)
{
    for (int i = 0; i < 1000000 && (mmio_read32(M.lapic_base + LAPIC_ICR_LO) & ICR_BUSY); i++)
        cpu_relax();
}

static void send_ipi(uint32_t apic_id, uint32_t icr)
{
    lapic_wait_idle();
    mmio_write32(M.lapic_base + LAPIC_ICR_HI, apic_id << 24);
    mmio_write32(M.lapic_base + LAPIC_ICR_LO, icr);
    lapic_wait_idle();
}

static int wait_alive(unsigned idx, uint64_t cycles)
{
    uint64_t start = rdtsc();
    while (rdtsc() - start < cycles) {
        if (__atomic_load_n(&ap_alive[idx], __ATOMIC_ACQUIRE))
            return 1;
        cpu_relax();
    }
    return 0;
}

void smp_init(void)
{
    M.cpus_up = 1;
    if (!M.lapic_base)
        M.lapic_base = 0xFEE00000;
    M.bsp_apic_id = mmio_read32(M.lapic_base + LAPIC_ID) >> 24;
    if (M.ncpus <= 1)
        return;
    memcpy((void *)TRAMPOLINE_ADDR, ap_trampoline, (size_t)(ap_trampoline_end - ap_trampoline));
    unsigned n = M.ncpus < MAX_CPUS ? M.ncpus : MAX_CPUS;
    unsigned idx = 1;
    for (unsigned i = 0; i < n; i++) {
        uint32_t id = M.apic_ids[i];
        if (id == M.bsp_apic_id)
            continue;
        ap_boot_index = idx;
        ap_boot_stack = (uint64_t)(uintptr_t)(stacks + (uint64_t)(idx + 1) * STACK_SIZE);
                /* ltr marks the descriptor busy; mark it available again for this AP. */
        gdt_ap_tss[5] = 0x89;
        mb();
        send_ipi(id, ICR_INIT);
        send_ipi(id, ICR_STARTUP | (TRAMPOLINE_ADDR >> 12));
        if (!wait_alive(idx, 300000000ull)) {
            send_ipi(id, ICR_STARTUP | (TRAMPOLINE_ADDR >> 12));
            if (!wait_alive(idx, 10000000000ull)) {
                println("TESTGUEST-AP apic=%u did not start", id);
                continue;
            }
        }
        idx++;
        M.cpus_up++;
    }
}

void ap_main(unsigned idx)
{
    uint32_t id = mmio_read32(M.lapic_base + LAPIC_ID) >> 24;
    println("TESTGUEST-AP %u alive apic=%u", idx, id);
    __atomic_store_n(&ap_alive[idx], 1, __ATOMIC_RELEASE);
}
