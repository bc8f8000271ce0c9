/* virtio-blk (virtio 1.2 §5.2) over the polling driver, and the `blk`
 * commands the host's tests and benchmarks type on the console:
 *
 *   blk info                        BLK info capacity=<sectors> ...
 *   blk use N                       pick the N-th virtio-blk device (default 0)
 *   blk read SECTOR COUNT           BLK read sector=S count=C crc32=0x........
 *   blk write SECTOR COUNT BYTE     fills with BYTE; BLK write ... crc32=0x........
 *   blk flush                       BLK flush ok
 *   blk bench MODE BS QD SECONDS    MODE = read|write|randread|randwrite;
 *                                   BLK bench mode=... mbps=... iops=... p50_us=... p99_us=...
 *                                   max_us=... mean_us=...
 * Errors are one line starting with ERR. crc32 is zlib's, so tests can compare. */
#include "virtio.h"

#define VIRTIO_BLK_T_IN    0
#define VIRTIO_BLK_T_OUT   1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_F_RO    5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_MQ    12
#define BLK_MAX_QUEUES     8

#define SLOTS      32
#define SMALL_BUF  (4u << 20)       /* in the image: read/write commands, fallback */
#define BIG_BUF    (32u << 20)      /* from RAM: bench with up to 32 x 1 MiB in flight */
#define CHUNK      (64u << 10)      /* per request for read/write commands */
#define MAX_SAMPLES (256u * 1024)

struct blk_req_hdr { uint32_t type, reserved; uint64_t sector; };

static struct {
    int ready;
    unsigned which;
    struct virtio_dev dev;
    struct virtqueue vqs[BLK_MAX_QUEUES];
    unsigned nq;
    uint64_t capacity;
} B;
#define VQ0 (&B.vqs[0])

static struct blk_req_hdr hdrs[SLOTS] __attribute__((aligned(64)));
static volatile uint8_t statuses[SLOTS];
static uint8_t small_buf[SMALL_BUF] __attribute__((aligned(4096)));
static uint8_t *data = small_buf;
static uint64_t data_bytes = SMALL_BUF;

/* The bench buffer: BIG_BUF from free RAM if the guest has it (pre-touched so
 * first-use page faults stay out of the measurement), else the small one. */
static void grow_buffer(void)
{
    static int tried;
    if (tried)
        return;
    tried = 1;
    uint8_t *big = ram_alloc(BIG_BUF, 2u << 20);
    if (big) {
        memset(big, 0, BIG_BUF);
        data = big;
        data_bytes = BIG_BUF;
    }
}
/* Latency samples in TSC cycles (see src/stats.c). */
static uint32_t samples[MAX_SAMPLES];
static struct latency lat;

static int blk_init(void)
{
    if (B.ready)
        return 0;
    int r = virtio_find(2, B.which, &B.dev);
    if (r == -2) {
        println("ERR blk device has no usable modern capabilities (BARs unassigned?)");
        return -1;
    }
    if (r) {
        println("ERR no virtio-blk device %u", B.which);
        return -1;
    }
    if (virtio_negotiate(&B.dev, (1ull << VIRTIO_BLK_F_FLUSH) | (1ull << VIRTIO_BLK_F_RO) |
                                     (1ull << VIRTIO_BLK_F_BLK_SIZE) | (1ull << VIRTIO_BLK_F_MQ))) {
        println("ERR blk feature negotiation failed");
        return -1;
    }
    /* num_queues sits at offset 34 of the device config (§5.2.4), valid with MQ. */
    B.nq = B.dev.features & (1ull << VIRTIO_BLK_F_MQ) ? mmio_read16(B.dev.devcfg + 34) : 1;
    if (B.nq == 0)
        B.nq = 1;
    if (B.nq > BLK_MAX_QUEUES)
        B.nq = BLK_MAX_QUEUES;
    for (unsigned q = 0; q < B.nq; q++) {
        if (virtio_setup_queue(&B.dev, &B.vqs[q], (uint16_t)q, 256)) {
            println("ERR blk queue %u setup failed", q);
            return -1;
        }
    }
    virtio_driver_ok(&B.dev);
    B.capacity = mmio_read64(B.dev.devcfg);
    B.ready = 1;
    return 0;
}

/* Queues one request in slot s; data may be NULL for FLUSH. */
static int submit(struct virtqueue *vq, unsigned s, uint32_t type, uint64_t sector, void *buf, uint32_t len)
{
    hdrs[s] = (struct blk_req_hdr){type, 0, sector};
    statuses[s] = 0xFF;
    uint64_t addr[3] = {(uint64_t)(uintptr_t)&hdrs[s], (uint64_t)(uintptr_t)buf,
                        (uint64_t)(uintptr_t)&statuses[s]};
    uint32_t lens[3] = {sizeof(hdrs[s]), len, 1};
    int wr[3] = {0, type == VIRTIO_BLK_T_IN, 1};
    if (!buf) {
        addr[1] = addr[2];
        lens[1] = 1;
        wr[1] = 1;
        return vq_add(vq, addr, lens, wr, 2);
    }
    return vq_add(vq, addr, lens, wr, 3);
}

/* Runs one request to completion; returns the virtio status (0 = OK) or -1. */
static int do_sync(uint32_t type, uint64_t sector, void *buf, uint32_t len)
{
    int head = submit(VQ0, 0, type, sector, buf, len);
    if (head < 0)
        return -1;
    vq_kick(VQ0);
    uint32_t id, used_len;
    uint64_t start = rdtsc();
    while (!vq_poll(VQ0, &id, &used_len)) {
        cpu_relax();
        if (rdtsc() - start > 100000000000ull)
            return -1;
    }
    vq_free_chain(VQ0, (uint16_t)id);
    return statuses[0];
}

static int parse_args(int argc, char **argv, int first, int n, uint64_t *out)
{
    if (argc != first + n)
        return -1;
    for (int i = 0; i < n; i++)
        if (parse_u64(argv[first + i], &out[i]))
            return -1;
    return 0;
}

static void blk_rw(int is_write, uint64_t sector, uint64_t count, uint8_t fill)
{
    if (sector > B.capacity || count > B.capacity - sector) {
        println("ERR blk range past the end (capacity %lu)", B.capacity);
        return;
    }
    uint32_t crc = 0;
    if (is_write)
        memset(data, fill, CHUNK);
    for (uint64_t done = 0; done < count;) {
        uint64_t n = count - done;
        if (n > CHUNK / 512)
            n = CHUNK / 512;
        int st = do_sync(is_write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, sector + done, data,
                         (uint32_t)(n * 512));
        if (st) {
            println("ERR blk %s failed at sector %lu status %d", is_write ? "write" : "read",
                    sector + done, st);
            return;
        }
        crc = crc32(crc, data, n * 512);
        done += n;
    }
    println("BLK %s sector=%lu count=%lu crc32=0x%08x", is_write ? "write" : "read", sector, count, crc);
}

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void blk_bench(const char *mode, uint64_t bs, uint64_t qd, uint64_t seconds)
{
    int is_write = !strcmp(mode, "write") || !strcmp(mode, "randwrite");
    int is_rand = !strcmp(mode, "randread") || !strcmp(mode, "randwrite");
    if (!is_write && !is_rand && strcmp(mode, "read")) {
        println("ERR blk bench mode must be read|write|randread|randwrite");
        return;
    }
    grow_buffer();
    if (!bs || bs % 512 || bs > data_bytes || !qd || !seconds || seconds > 600) {
        println("ERR blk bench bad size, depth or duration");
        return;
    }
    if (qd > SLOTS)
        qd = SLOTS;
    if (qd * bs > data_bytes)
        qd = data_bytes / bs;
    /* Slot s uses queue s % nq; each request takes 3 descriptors. */
    if (qd > (uint64_t)(VQ0->size / 3) * B.nq)
        qd = (uint64_t)(VQ0->size / 3) * B.nq;
    uint64_t blocks = B.capacity / (bs / 512);
    if (!blocks) {
        println("ERR blk device smaller than the block size");
        return;
    }
    uint64_t khz = tsc_khz();
    uint32_t type = is_write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    static uint16_t head_slot[BLK_MAX_QUEUES][VQ_MAX];
    uint64_t start_tsc[SLOTS];
    /* Where each slot's request is (queue, head), so a used id that is not in
     * flight — a device bug — is reported instead of timing another request. */
    uint8_t slot_busy[SLOTS] = {0};
    uint16_t slot_head[SLOTS];
    uint64_t per_queue[BLK_MAX_QUEUES] = {0};
    uint64_t next_block = 0, ios = 0;
    uint64_t t0 = rdtsc(), deadline = t0 + seconds * khz * 1000;
    unsigned inflight = 0;
    int stopping = 0;
    latency_init(&lat, samples, MAX_SAMPLES);
    for (unsigned s = 0; s < qd; s++) {
        struct virtqueue *vq = &B.vqs[s % B.nq];
        uint64_t blk = is_rand ? next_rand() % blocks : next_block++ % blocks;
        start_tsc[s] = rdtsc();
        int head = submit(vq, s, type, blk * (bs / 512), data + s * bs, (uint32_t)bs);
        if (head < 0)
            break;
        head_slot[s % B.nq][head] = (uint16_t)s;
        slot_head[s] = (uint16_t)head;
        slot_busy[s] = 1;
        inflight++;
    }
    for (unsigned q = 0; q < B.nq; q++)
        vq_kick(&B.vqs[q]);
    unsigned q = 0;
    while (inflight) {
        uint32_t id, len;
        struct virtqueue *vq = &B.vqs[q];
        if (!vq_poll(vq, &id, &len)) {
            q = (q + 1) % B.nq;
            cpu_relax();
            continue;
        }
        uint64_t now = rdtsc();
        unsigned s = id < vq->size ? head_slot[q][id] : 0;
        if (id >= vq->size || !slot_busy[s] || slot_head[s] != id || s % B.nq != q) {
            println("ERR blk device returned descriptor id %u on queue %u, not in flight", id, q);
            B.ready = 0;    /* the next command resets the device */
            return;
        }
        vq_free_chain(vq, (uint16_t)id);
        slot_busy[s] = 0;
        inflight--;
        if (statuses[s]) {
            println("ERR blk bench I/O failed, status %d", statuses[s]);
            B.ready = 0;
            return;
        }
        ios++;
        per_queue[q]++;
        latency_add(&lat, now - start_tsc[s]);
        if (now >= deadline)
            stopping = 1;
        if (!stopping) {
            uint64_t blk = is_rand ? next_rand() % blocks : next_block++ % blocks;
            start_tsc[s] = rdtsc();
            int head = submit(vq, s, type, blk * (bs / 512), data + s * bs, (uint32_t)bs);
            if (head < 0) {
                println("ERR blk ring full");
                B.ready = 0;
                return;
            }
            head_slot[q][head] = (uint16_t)s;
            slot_head[s] = (uint16_t)head;
            slot_busy[s] = 1;
            inflight++;
            vq_kick(vq);
        }
        /* Round robin: staying on a queue while it has completions would let
         * a fast queue starve the others' polling and add that wait to their
         * latencies. */
        q = (q + 1) % B.nq;
    }
    uint64_t elapsed_us = (rdtsc() - t0) * 1000 / khz;
    if (!elapsed_us)
        elapsed_us = 1;
    latency_finish(&lat);
    uint64_t p50 = (uint64_t)latency_percentile(&lat, 500) * 1000 / khz;
    uint64_t p99 = (uint64_t)latency_percentile(&lat, 990) * 1000 / khz;
    uint64_t max_us = lat.max * 1000 / khz;
    uint64_t mean_us = latency_mean(&lat) * 1000 / khz;
    uint64_t kbps = ios * bs * 1000 / elapsed_us;   /* bytes/us * 1000 = KB/s (decimal) */
    uint64_t iops_x10 = ios * 10000000ull / elapsed_us;
    char pq[BLK_MAX_QUEUES * 21 + 1];
    size_t o = 0;
    for (unsigned i = 0; i < B.nq; i++)
        o += (size_t)snprintf(pq + o, sizeof(pq) - o, "%s%lu", i ? "," : "", per_queue[i]);
    println("BLK bench mode=%s bs=%lu qd=%lu seconds=%lu.%03lu ios=%lu mbps=%lu.%03lu "
            "iops=%lu.%lu p50_us=%lu p99_us=%lu max_us=%lu mean_us=%lu queues=%u per_queue=%s "
            "tsc_khz=%lu%s",
            mode, bs, qd, elapsed_us / 1000000, (elapsed_us / 1000) % 1000, ios, kbps / 1000,
            kbps % 1000, iops_x10 / 10, iops_x10 % 10, p50, p99, max_us, mean_us, B.nq, pq, khz,
            tsc_khz_measured() ? "" : " tsc=assumed");
}

static void cmd_blk(int argc, char **argv, const char *rest)
{
    (void)rest;
    uint64_t a[4];
    if (argc >= 2 && !strcmp(argv[1], "use")) {
        if (parse_args(argc, argv, 2, 1, a)) {
            println("ERR usage: blk use N");
            return;
        }
        B.which = (unsigned)a[0];
        B.ready = 0;
        if (!blk_init())
            println("BLK use %u ok", B.which);
        return;
    }
    if (argc < 2) {
        println("ERR usage: blk info|use|read|write|flush|bench");
        return;
    }
    if (blk_init())
        return;
    if (!strcmp(argv[1], "info")) {
        println("BLK info capacity=%lu bytes=%lu features=0x%lx queues=%u qsize=%u ro=%d pci=%02x:%02x.%x",
                B.capacity, B.capacity * 512, B.dev.features, B.nq, VQ0->size,
                !!(B.dev.features & (1ull << VIRTIO_BLK_F_RO)), B.dev.bus, B.dev.dev, B.dev.fn);
    } else if (!strcmp(argv[1], "read")) {
        if (parse_args(argc, argv, 2, 2, a))
            println("ERR usage: blk read SECTOR COUNT");
        else
            blk_rw(0, a[0], a[1], 0);
    } else if (!strcmp(argv[1], "write")) {
        if (parse_args(argc, argv, 2, 3, a) || a[2] > 255)
            println("ERR usage: blk write SECTOR COUNT BYTE");
        else
            blk_rw(1, a[0], a[1], (uint8_t)a[2]);
    } else if (!strcmp(argv[1], "flush")) {
        int st = do_sync(VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
        if (st)
            println("ERR blk flush failed status %d", st);
        else
            println("BLK flush ok");
    } else if (!strcmp(argv[1], "bench")) {
        if (argc != 6 || parse_u64(argv[3], &a[0]) || parse_u64(argv[4], &a[1]) ||
            parse_u64(argv[5], &a[2]))
            println("ERR usage: blk bench read|write|randread|randwrite BS QD SECONDS");
        else
            blk_bench(argv[2], a[0], a[1], a[2]);
    } else {
        println("ERR unknown blk command");
    }
}
COMMAND("blk", cmd_blk, "blk info|use N|read S C|write S C BYTE|flush|bench MODE BS QD SECONDS");
