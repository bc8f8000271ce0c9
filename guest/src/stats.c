/* Latency statistics for the benchmarks: every sample counts towards the
 * count, sum and maximum; the percentiles come from a bounded array of kept
 * samples. Until it fills, every sample is kept; after that each new one
 * replaces a random kept one with probability cap/n (reservoir sampling,
 * Vitter's algorithm R), so the kept ones are a uniform sample of the whole
 * run and not, as a plain "stop when full" would give, of its first part.
 * Uses nothing but its arguments: tests/guest compiles it on the host. */
#include "testguest.h"

/* Heapsort: no recursion, no extra memory. */
void sort_u32(uint32_t *a, size_t n)
{
    for (size_t start = n / 2; start-- > 0;) {
        for (size_t root = start;;) {
            size_t child = 2 * root + 1;
            if (child >= n) break;
            if (child + 1 < n && a[child] < a[child + 1]) child++;
            if (a[root] >= a[child]) break;
            uint32_t t = a[root]; a[root] = a[child]; a[child] = t;
            root = child;
        }
    }
    for (size_t end = n; end-- > 1;) {
        uint32_t t = a[0]; a[0] = a[end]; a[end] = t;
        for (size_t root = 0;;) {
            size_t child = 2 * root + 1;
            if (child >= end) break;
            if (child + 1 < end && a[child] < a[child + 1]) child++;
            if (a[root] >= a[child]) break;
            t = a[root]; a[root] = a[child]; a[child] = t;
            root = child;
        }
    }
}

void latency_init(struct latency *l, uint32_t *buf, uint64_t cap)
{
    l->samples = buf;
    l->cap = cap;
    l->n = l->kept = l->sum = l->max = 0;
    l->rng = 0x9E3779B97F4A7C15ull;   /* its own stream: callers' random sequences stay as they were */
}

void latency_add(struct latency *l, uint64_t value)
{
    uint32_t v = value > 0xFFFFFFFFull ? 0xFFFFFFFFu : (uint32_t)value;
    l->n++;
    l->sum += value;
    if (value > l->max)
        l->max = value;
    if (l->kept < l->cap) {
        l->samples[l->kept++] = v;
        return;
    }
    l->rng ^= l->rng << 13;
    l->rng ^= l->rng >> 7;
    l->rng ^= l->rng << 17;
    uint64_t j = l->rng % l->n;
    if (j < l->cap)
        l->samples[j] = v;
}

void latency_finish(struct latency *l) { sort_u32(l->samples, (size_t)l->kept); }

uint32_t latency_percentile(const struct latency *l, unsigned per_mille)
{
    if (!l->kept)
        return 0;
    uint64_t rank = (l->kept * per_mille + 999) / 1000;
    return l->samples[rank ? rank - 1 : 0];
}

uint64_t latency_mean(const struct latency *l) { return l->n ? l->sum / l->n : 0; }
