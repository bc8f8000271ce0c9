/*
 * kitio: block I/O benchmark for the appliance Linux kit.
 *
 *   kitio bench --dev /dev/vda --mode read|write|randread|randwrite
 *               [--bs 4096] [--qd 32] [--seconds 5] [--size BYTES] [--offset BYTES]
 *               [--buffered]
 *
 * Keeps --qd requests in flight with Linux native AIO (io_setup/io_submit/
 * io_getevents called as raw syscalls, so no libaio is needed) on an O_DIRECT
 * file descriptor, which is how fio's libaio engine measures a disk: every
 * request reaches the device, none is served from the page cache. Prints one
 * machine-readable line:
 *
 *   KITIO mode=read bs=4096 qd=32 seconds=5.00 ios=N mbps=X iops=Y p50_us=A p99_us=B
 *
 * Exit status: 0 on success, 1 on an I/O error (reported as "KITIO error=…"),
 * 2 on bad arguments.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_QD 1024

static long sys_io_setup(unsigned nr, aio_context_t *ctx) { return syscall(SYS_io_setup, nr, ctx); }
static long sys_io_destroy(aio_context_t ctx) { return syscall(SYS_io_destroy, ctx); }
static long sys_io_submit(aio_context_t ctx, long n, struct iocb **iocbs)
{
    return syscall(SYS_io_submit, ctx, n, iocbs);
}
static long sys_io_getevents(aio_context_t ctx, long min, long max, struct io_event *ev,
                             struct timespec *timeout)
{
    return syscall(SYS_io_getevents, ctx, min, max, ev, timeout);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t xorshift64(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void usage(void)
{
    fprintf(stderr, "usage: kitio bench --dev PATH --mode read|write|randread|randwrite "
                    "[--bs N] [--qd N] [--seconds S] [--size BYTES] [--offset BYTES] [--buffered]\n");
    exit(2);
}

static unsigned long long parse_num(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s)
        usage();
    switch (*end) {
    case 'k': case 'K': v <<= 10; end++; break;
    case 'm': case 'M': v <<= 20; end++; break;
    case 'g': case 'G': v <<= 30; end++; break;
    }
    if (*end)
        usage();
    return v;
}

struct slot {
    struct iocb cb;
    uint64_t start_ns;
    void *buf;
};

int main(int argc, char **argv)
{
    const char *dev = NULL, *mode = "read";
    unsigned long long bs = 4096, qd = 32, size = 0, offset = 0;
    double seconds = 5.0;
    int direct = 1;

    if (argc < 2 || strcmp(argv[1], "bench") != 0)
        usage();
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--buffered")) { direct = 0; continue; }
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--dev")) dev = v;
        else if (!strcmp(a, "--mode")) mode = v;
        else if (!strcmp(a, "--bs")) bs = parse_num(v);
        else if (!strcmp(a, "--qd")) qd = parse_num(v);
        else if (!strcmp(a, "--size")) size = parse_num(v);
        else if (!strcmp(a, "--offset")) offset = parse_num(v);
        else if (!strcmp(a, "--seconds")) seconds = atof(v);
        else usage();
    }
    int is_write = !strcmp(mode, "write") || !strcmp(mode, "randwrite");
    int is_rand = !strcmp(mode, "randread") || !strcmp(mode, "randwrite");
    if (!dev || (!is_write && !is_rand && strcmp(mode, "read")) || bs == 0 || bs % 512 ||
        qd == 0 || qd > MAX_QD || seconds <= 0)
        usage();

    int fd = open(dev, (is_write ? O_RDWR : O_RDONLY) | (direct ? O_DIRECT : 0));
    if (fd < 0) {
        printf("KITIO error=open errno=%d\n", errno);
        return 1;
    }
    unsigned long long devsize = 0;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode))
        ioctl(fd, BLKGETSIZE64, &devsize);
    else if (fstat(fd, &st) == 0)
        devsize = (unsigned long long)st.st_size;
    if (offset >= devsize) {
        printf("KITIO error=offset-past-end size=%llu\n", devsize);
        return 1;
    }
    if (size == 0 || size > devsize - offset)
        size = devsize - offset;
    unsigned long long blocks = size / bs;
    if (blocks == 0) {
        printf("KITIO error=device-smaller-than-bs size=%llu\n", size);
        return 1;
    }

    aio_context_t ctx = 0;
    if (sys_io_setup((unsigned)qd, &ctx) < 0) {
        printf("KITIO error=io_setup errno=%d\n", errno);
        return 1;
    }
    struct slot *slots = calloc(qd, sizeof(*slots));
    struct io_event *events = calloc(qd, sizeof(*events));
    size_t lat_cap = 1 << 16, lat_n = 0;
    uint64_t *lat = malloc(lat_cap * sizeof(*lat));
    if (!slots || !events || !lat)
        return 1;
    for (unsigned long long i = 0; i < qd; i++) {
        if (posix_memalign(&slots[i].buf, 4096, bs))
            return 1;
        memset(slots[i].buf, 0xA5 ^ (int)i, bs);
    }

    unsigned long long next_block = 0;
    uint64_t t0 = now_ns(), deadline = t0 + (uint64_t)(seconds * 1e9);
    unsigned long long inflight = 0, done_ios = 0;
    struct iocb *batch[MAX_QD];
    int stopping = 0;

    /* Prepare and submit one request in slot i. */
#define PREP(i) do {                                                              \
        unsigned long long blk = is_rand ? xorshift64() % blocks : next_block++ % blocks; \
        struct slot *s = &slots[i];                                               \
        memset(&s->cb, 0, sizeof(s->cb));                                         \
        s->cb.aio_data = (i);                                                     \
        s->cb.aio_lio_opcode = is_write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;       \
        s->cb.aio_fildes = (uint32_t)fd;                                          \
        s->cb.aio_buf = (uint64_t)(uintptr_t)s->buf;                              \
        s->cb.aio_nbytes = bs;                                                    \
        s->cb.aio_offset = (int64_t)(offset + blk * bs);                          \
        s->start_ns = now_ns();                                                   \
    } while (0)

    for (unsigned long long i = 0; i < qd; i++) {
        PREP(i);
        batch[i] = &slots[i].cb;
    }
    if (sys_io_submit(ctx, (long)qd, batch) != (long)qd) {
        printf("KITIO error=io_submit errno=%d\n", errno);
        return 1;
    }
    inflight = qd;
    while (inflight) {
        long n = sys_io_getevents(ctx, 1, (long)qd, events, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            printf("KITIO error=io_getevents errno=%d\n", errno);
            return 1;
        }
        uint64_t t = now_ns();
        if (t >= deadline)
            stopping = 1;
        long nb = 0;
        for (long e = 0; e < n; e++) {
            unsigned long long i = events[e].data;
            if (i >= qd)
                return 1;
            if (events[e].res != (int64_t)bs) {
                printf("KITIO error=io res=%lld offset=%lld\n", (long long)events[e].res,
                       (long long)slots[i].cb.aio_offset);
                return 1;
            }
            if (lat_n == lat_cap) {
                lat_cap *= 2;
                lat = realloc(lat, lat_cap * sizeof(*lat));
                if (!lat)
                    return 1;
            }
            lat[lat_n++] = t - slots[i].start_ns;
            done_ios++;
            inflight--;
            if (!stopping) {
                PREP(i);
                batch[nb++] = &slots[i].cb;
            }
        }
        if (nb) {
            if (sys_io_submit(ctx, nb, batch) != nb) {
                printf("KITIO error=io_submit errno=%d\n", errno);
                return 1;
            }
            inflight += (unsigned long long)nb;
        }
    }
    double elapsed = (double)(now_ns() - t0) / 1e9;
    sys_io_destroy(ctx);
    qsort(lat, lat_n, sizeof(*lat), cmp_u64);
    double p50 = lat_n ? (double)lat[lat_n / 2] / 1000.0 : 0;
    double p99 = lat_n ? (double)lat[(lat_n * 99) / 100 < lat_n ? (lat_n * 99) / 100 : lat_n - 1] / 1000.0 : 0;
    printf("KITIO mode=%s bs=%llu qd=%llu seconds=%.2f ios=%llu mbps=%.2f iops=%.1f p50_us=%.1f p99_us=%.1f\n",
           mode, bs, qd, elapsed, done_ios, (double)done_ios * (double)bs / elapsed / 1e6,
           (double)done_ios / elapsed, p50, p99);
    return 0;
}
