/* Host-side driver for guest/src/stats.c (compiled by test_latency_stats.py).
 *
 *   latency_driver CAP PER_MILLE...      values on stdin, one per line
 *   latency_driver CAP PER_MILLE... -- N1 V1 N2 V2 ...
 *                                         N1 samples of V1, then N2 of V2, ...
 *
 * Prints "n kept sum max mean" then one percentile per PER_MILLE, space-separated. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testguest.h"

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    uint64_t cap = strtoull(argv[1], NULL, 0);
    uint32_t *buf = malloc((cap ? cap : 1) * sizeof(*buf));
    struct latency l;
    latency_init(&l, buf, cap);
    int first_run = argc, npm = 0;
    unsigned pm[64];
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--")) {
            first_run = i + 1;
            break;
        }
        if (npm < 64)
            pm[npm++] = (unsigned)strtoul(argv[i], NULL, 0);
    }
    if (first_run < argc) {
        for (int i = first_run; i + 1 < argc; i += 2) {
            uint64_t n = strtoull(argv[i], NULL, 0), v = strtoull(argv[i + 1], NULL, 0);
            for (uint64_t k = 0; k < n; k++)
                latency_add(&l, v);
        }
    } else {
        unsigned long long v;
        while (scanf("%llu", &v) == 1)
            latency_add(&l, v);
    }
    latency_finish(&l);
    for (uint64_t i = 1; i < l.kept; i++)
        if (l.samples[i - 1] > l.samples[i])
            return 3;   /* not sorted */
    printf("%llu %llu %llu %llu %llu", (unsigned long long)l.n, (unsigned long long)l.kept,
           (unsigned long long)l.sum, (unsigned long long)l.max, (unsigned long long)latency_mean(&l));
    for (int i = 0; i < npm; i++)
        printf(" %u", latency_percentile(&l, pm[i]));
    printf("\n");
    return 0;
}
