/* Time from the TSC, calibrated once against the PIT (1.193182 MHz): channel 2
 * (gate and output through port 0x61) or, where port 0x61 is missing
 * (microvm), channel 0 read by latch commands. Without a PIT (port 0x61 floats
 * high) the rate is unknown: 1 GHz is assumed and tsc_khz_measured() says so.
 *
 * Each PIT access is a VM exit, and on a busy host the vCPU can be descheduled
 * inside any of them, so a single window can come out long or short. Every
 * event the calibration times (the PIT starting, its output rising, a latch)
 * happens inside one port access, so it is bracketed by a TSC read before and
 * after that access: a window's length is known to within the sum of its two
 * brackets. Up to three windows known to 0.5% are taken and the
 * best-bracketed one of all those tried is used (its midpoint is within half
 * its uncertainty; `time` prints that as err_ppm). (Taking the minimum of plain windows, as this
 * file once did, read 3.06 GHz for a 2.6 GHz TSC on a loaded host: a delayed
 * port write makes a window long just as a late poll makes one short.) */
#include "testguest.h"

#define PIT_HZ 1193182ull
#define MAX_TRIES 40

static uint64_t khz;
static int measured = -1;
static uint64_t err_ppm;

struct window { uint64_t cycles, err, ticks; };

static int better(const struct window *w, const struct window *best)
{
    /* Relative uncertainty err/cycles, compared without division. */
    return !best->cycles || w->err * best->cycles < best->err * w->cycles;
}

/* Channel 2 in mode 0 (interrupt on terminal count) with the gate on: the
 * output goes low when the control word is written and high `ticks` clocks
 * after the count's high byte is. Returns 0 if port 0x61 shows no PIT or
 * the output never rises. */
static int ch2_window(uint16_t ticks, struct window *w)
{
    uint8_t p61 = inb(0x61);
    outb(0x61, (uint8_t)((p61 & ~0x02) | 0x01));
    outb(0x43, 0xB0);                       /* channel 2, lo/hi byte, mode 0 */
    outb(0x42, (uint8_t)(ticks & 0xFF));
    uint64_t s0 = rdtsc();
    outb(0x42, (uint8_t)(ticks >> 8));      /* counting starts in here */
    uint64_t s1 = rdtsc();
    uint64_t e0 = s0, e1 = s1;
    unsigned polls = 0;
    for (;; polls++) {
        uint64_t before = rdtsc();
        int high = inb(0x61) & 0x20;
        e1 = rdtsc();
        if (high)
            break;                          /* it rose after `before`... */
        e0 = before;                        /* ...of the poll that still saw it low */
        if (e1 - s1 > 4000000000ull) {      /* >= 0.4 s at any rate we accept: stuck */
            outb(0x61, p61);
            return 0;
        }
    }
    outb(0x61, p61);
    if (polls < 10)
        return 0;                           /* high at once: nothing there */
    uint64_t shortest = e0 - s1, longest = e1 - s0;
    w->cycles = (shortest + longest) / 2;
    w->err = longest - shortest;
    w->ticks = ticks;
    return 1;
}

/* Channel 0 as a free-running 16-bit down-counter (mode 2, count 65536),
 * read with latch commands; interrupts are off (IF = 0), so its IRQ 0 ticks
 * are never taken. *lo and *hi bracket the latch. */
static uint16_t ch0_read(uint64_t *lo, uint64_t *hi)
{
    *lo = rdtsc();
    outb(0x43, 0x00);                       /* latch channel 0 */
    *hi = rdtsc();
    uint8_t l = inb(0x40);
    uint8_t h = inb(0x40);
    return (uint16_t)(h << 8 | l);
}

/* 1 with a window, 0 for a run to throw away, -1 if the counter never moves. */
static int ch0_window(struct window *w)
{
    outb(0x43, 0x34);                       /* channel 0, lo/hi byte, mode 2 */
    outb(0x40, 0);
    outb(0x40, 0);
    uint64_t s0, s1, e0 = 0, e1 = 0, last;
    uint16_t prev = ch0_read(&s0, &s1);
    uint64_t max_gap = 0, ticks = 0;
    last = s1;
    /* 50 ms, with reads far closer together than the counter's 55 ms period. */
    for (unsigned polls = 0; ticks < 59659 && polls < 10000000; polls++) {
        if (polls == 1000 && !ticks)   /* a tick is 0.84 us; a read takes longer */
            return -1;
        uint16_t c = ch0_read(&e0, &e1);
        ticks += (uint16_t)(prev - c);      /* counts down; wraps modulo 65536 */
        prev = c;
        if (e1 - last > max_gap)
            max_gap = e1 - last;
        last = e1;
    }
    /* A vCPU descheduled for a whole counter period would lose a wrap unseen. */
    if (ticks < 59659 || max_gap * 3 > e1 - s0)
        return 0;
    uint64_t shortest = e0 - s1, longest = e1 - s0;
    w->cycles = (shortest + longest) / 2;
    w->err = longest - shortest;
    w->ticks = ticks;
    return 1;
}

static uint64_t calibrate(void)
{
    struct window best = {0, 0, 0}, w;
    int ch0 = 0, good = 0;
    for (int i = 0; i < MAX_TRIES && good < 3; i++) {
        int ok = ch0 ? ch0_window(&w) : ch2_window(59659, &w);     /* 50 ms */
        if (!ok && !ch0) {
            ch0 = 1;                        /* no port 0x61 (or stuck): channel 0 from now on */
            ok = ch0_window(&w);
        }
        if (ok < 0)
            return 0;                       /* no PIT */
        if (!ok)
            continue;
        if (w.err * 200 <= w.cycles)        /* known to 0.5%, i.e. +-0.25% */
            good++;
        if (better(&w, &best))
            best = w;
    }
    if (!best.cycles || best.err * 50 > best.cycles)
        return 0;                           /* never better than 2%: give up */
    err_ppm = best.err * 1000000 / best.cycles / 2;
    uint64_t k = best.cycles * PIT_HZ / (best.ticks * 1000);
    return k >= 100000 && k <= 10000000 ? k : 0;
}

uint64_t tsc_khz(void)
{
    if (measured < 0) {
        uint64_t best = calibrate();
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

static void cmd_time(int argc, char **argv, const char *rest)
{
    (void)argc;
    (void)argv;
    (void)rest;
    uint64_t k = tsc_khz();
    println("TIME tsc_khz=%lu measured=%d err_ppm=%lu", k, measured, err_ppm);
}
COMMAND("time", cmd_time, "time: the TSC rate and how well it is known");

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
