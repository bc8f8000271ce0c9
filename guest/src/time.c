/* Time from the TSC, calibrated once against PIT channel 2 (gate and output
 * via port 0x61) over 10 ms windows, or channel 0 where port 0x61 is missing. Each poll of port 0x61 is a VM exit; on a
 * busy host one can return late, which only ever lengthens the measured
 * window, so the minimum of several runs is the estimate. Without a PIT
 * (port 0x61 floats high) the rate is unknown: 1 GHz is assumed and
 * tsc_khz_measured() says so. */
#include "testguest.h"

static uint64_t khz;
static int measured = -1;

static uint64_t calibrate_once(void)
{
    uint8_t p61 = inb(0x61);
    outb(0x61, (uint8_t)((p61 & ~0x02) | 0x01));
    outb(0x43, 0xB0);                       /* channel 2, lo/hi byte, mode 0 */
    outb(0x42, 11932 & 0xFF);               /* 1193182 Hz / 100 */
    outb(0x42, 11932 >> 8);
    uint64_t t0 = rdtsc();
    unsigned polls = 0;
    while (!(inb(0x61) & 0x20) && polls < 10000000)
        polls++;
    uint64_t t1 = rdtsc();
    outb(0x61, p61);
    uint64_t k = (t1 - t0) / 10;
    if (polls < 10 || k < 100000 || k > 10000000)
        return 0;
    return k;
}

/* Without port 0x61 (QEMU microvm has a PIT but no speaker port) channel 2
 * cannot be gated, so run channel 0 as a free-running 16-bit down-counter
 * (mode 2, count 65536) and read it with latch commands. Interrupts are off
 * (IF = 0), so its IRQ 0 ticks are never taken. */
static uint16_t ch0_read(void)
{
    outb(0x43, 0x00);                       /* latch channel 0 */
    uint8_t lo = inb(0x40);
    uint8_t hi = inb(0x40);
    return (uint16_t)(hi << 8 | lo);
}

static uint64_t calibrate_ch0_once(void)
{
    outb(0x43, 0x34);                       /* channel 0, lo/hi byte, mode 2 */
    outb(0x40, 0);
    outb(0x40, 0);
    uint16_t prev = ch0_read();
    uint64_t t0 = rdtsc(), last = t0, max_gap = 0, ticks = 0;
    /* 50 ms: the latch-to-rdtsc lag (a few port exits) is then well under 1%. */
    for (unsigned polls = 0; ticks < 59659 && polls < 10000000; polls++) {
        uint16_t c = ch0_read();
        uint64_t now = rdtsc();
        ticks += (uint16_t)(prev - c);      /* counts down; wraps modulo 65536 */
        prev = c;
        if (now - last > max_gap)
            max_gap = now - last;
        last = now;
    }
    uint64_t t1 = last;
    /* A vCPU descheduled for a whole counter period (55 ms) would lose a wrap
     * unseen; a run in which one gap took more than a third of the time is
     * thrown away. Otherwise late polls are harmless: ticks and TSC move together. */
    if (ticks < 59659 || max_gap * 3 > t1 - t0)
        return 0;
    uint64_t k = (t1 - t0) * 1193182 / (ticks * 1000);
    return k >= 100000 && k <= 10000000 ? k : 0;
}

static uint64_t calibrate_ch0(void)
{
    for (int i = 0; i < 10; i++) {
        uint64_t k = calibrate_ch0_once();
        if (k)
            return k;
    }
    return 0;
}

static uint64_t best_of(uint64_t (*fn)(void))
{
    uint64_t best = 0;
    for (int i = 0; i < 5; i++) {
        uint64_t k = fn();
        if (!k)
            return 0;
        if (!best || k < best)
            best = k;
    }
    return best;
}

uint64_t tsc_khz(void)
{
    if (measured < 0) {
        uint64_t best = best_of(calibrate_once);
        if (!best)
            best = calibrate_ch0();
        measured = best != 0;
        khz = best ? best : 1000000;
    }
    return khz;
}

int tsc_khz_measured(void)
{
    tsc_khz();
    return measured;
}

uint64_t now_us(void) { return rdtsc() * 1000 / tsc_khz(); }

/* ---- idle hooks: run while the command loop waits for input ---- */
static void (*hooks[4])(void);

void idle_hook_add(void (*fn)(void))
{
    for (unsigned i = 0; i < ARRAY_SIZE(hooks); i++) {
        if (hooks[i] == fn)
            return;
        if (!hooks[i]) {
            hooks[i] = fn;
            return;
        }
    }
}

void idle_poll(void)
{
    for (unsigned i = 0; i < ARRAY_SIZE(hooks) && hooks[i]; i++)
        hooks[i]();
}
