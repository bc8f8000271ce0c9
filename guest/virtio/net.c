/* virtio-net (virtio 1.2 §5.1) over the polling driver, a tiny IPv4 host, and
 * the `net` commands:
 *
 *   net info                       NET info mac=... mtu=... link=up|down features=0x...
 *                                  ... speed=MBPS|unknown duplex=half|full|unknown
 *   net use N                      pick the N-th virtio-net device (default 0)
 *   net ip A.B.C.D [GW]            our address (the responder answers ARP for it,
 *                                  ICMP echo to it, UDP to port 7 is echoed)
 *   net send HEX                   transmit one raw Ethernet frame
 *   net recv [MS] [ETHERTYPE]      print the next frame the responder did not consume
 *   net ping A.B.C.D [COUNT]       ICMP echo; NET ping reply from=... seq=... time_us=...
 *   net dhcp                       DHCP client; NET dhcp ip=... mask=... router=... dns=...
 *   net bench tx SIZE SECONDS [DSTMAC]   transmit blaster
 *   net bench rx SECONDS                 receive sink
 *                                  NET bench dir=... frames=... fps=... gbps=...
 * The responder also runs while the command loop waits for input.
 *
 * Every frame carries the 12-byte virtio-net header (VERSION_1 always includes
 * num_buffers). It is all zero (complete frames, our own checksums) except in
 * `net bench tso`, which uses CSUM + HOST_TSO4 when the device offers them:
 *   net bench tso SECONDS [DSTMAC]  64 KiB TCP/IPv4 frames the device segments */
#include "virtio.h"

#define VIRTIO_NET_F_CSUM   0
#define VIRTIO_NET_F_MTU    3
#define VIRTIO_NET_F_HOST_TSO4 11
#define VIRTIO_NET_F_MAC    5
#define VIRTIO_NET_F_STATUS 16
#define VIRTIO_NET_F_SPEED_DUPLEX 63
#define NET_HDR 12
#define RXBUF   2048
#define NRX     128
#define NTX     128
#define TXBUF   2048

static struct {
    int ready;
    unsigned which;
    struct virtio_dev dev;
    struct virtqueue rx, tx;
    uint8_t mac[6];
    uint16_t mtu;
    uint32_t ip, gw;                 /* host byte order; 0 = none */
    uint64_t rx_frames, tx_frames, rx_dropped;
} N;

static uint8_t rxbufs[NRX][RXBUF] __attribute__((aligned(4096)));
static uint8_t txbufs[NTX][TXBUF] __attribute__((aligned(4096)));
static uint16_t tx_free[NTX];
static unsigned tx_nfree;
static uint16_t tx_head_buf[VQ_MAX];
static uint16_t rx_head_buf[VQ_MAX];

/* Frames the responder did not consume wait in a small queue (a bridge brings
 * IPv6 neighbour discovery and the like at any time); `pending` is the one a
 * command is looking at, copied out of the queue. */
#define PQ 64
static uint8_t pq[PQ][RXBUF];
static unsigned pq_len[PQ], pq_head, pq_n;
static uint8_t pending[RXBUF];
static unsigned pending_len;

static const uint8_t BCAST[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v; }

static uint16_t csum(const uint8_t *p, size_t n)
{
    uint32_t s = 0;
    for (size_t i = 0; i + 1 < n; i += 2)
        s += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (n & 1)
        s += (uint32_t)p[n - 1] << 8;
    while (s >> 16)
        s = (s & 0xFFFF) + (s >> 16);
    return (uint16_t)~s;
}

static void fmt_ip(char *buf, uint32_t ip)
{
    snprintf(buf, 16, "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255);
}

static int parse_ip(const char *s, uint32_t *out)
{
    uint32_t ip = 0;
    for (int part = 0; part < 4; part++) {
        uint32_t v = 0;
        int digits = 0;
        while (*s >= '0' && *s <= '9' && digits < 4) {
            v = v * 10 + (uint32_t)(*s++ - '0');
            digits++;
        }
        if (!digits || v > 255)
            return -1;
        ip = ip << 8 | v;
        if (part < 3 && *s++ != '.')
            return -1;
    }
    if (*s)
        return -1;
    *out = ip;
    return 0;
}

static int parse_mac(const char *s, uint8_t *mac)
{
    for (int i = 0; i < 6; i++) {
        unsigned v = 0;
        for (int k = 0; k < 2; k++, s++) {
            char c = *s;
            unsigned d = c >= '0' && c <= '9' ? (unsigned)(c - '0')
                       : c >= 'a' && c <= 'f' ? (unsigned)(c - 'a' + 10)
                       : c >= 'A' && c <= 'F' ? (unsigned)(c - 'A' + 10) : 16;
            if (d > 15)
                return -1;
            v = v << 4 | d;
        }
        mac[i] = (uint8_t)v;
        if (i < 5 && *s++ != ':')
            return -1;
    }
    return *s ? -1 : 0;
}

static void post_rx(uint16_t i)
{
    uint64_t addr = (uint64_t)(uintptr_t)rxbufs[i];
    uint32_t len = RXBUF;
    int wr = 1;
    int head = vq_add(&N.rx, &addr, &len, &wr, 1);
    if (head >= 0)
        rx_head_buf[head] = i;
}

static void net_poll(void);

static int net_init(void)
{
    if (N.ready)
        return 0;
    int r = virtio_find(1, N.which, &N.dev);
    if (r == -2) {
        println("ERR net device has no usable modern capabilities (BARs unassigned?)");
        return -1;
    }
    if (r) {
        println("ERR no virtio-net device %u", N.which);
        return -1;
    }
    if (virtio_negotiate(&N.dev, (1ull << VIRTIO_NET_F_MAC) | (1ull << VIRTIO_NET_F_STATUS) |
                                     (1ull << VIRTIO_NET_F_MTU) | (1ull << VIRTIO_NET_F_CSUM) |
                                     (1ull << VIRTIO_NET_F_HOST_TSO4) |
                                     (1ull << VIRTIO_NET_F_SPEED_DUPLEX))) {
        println("ERR net feature negotiation failed");
        return -1;
    }
    if (virtio_setup_queue(&N.dev, &N.rx, 0, 256) || virtio_setup_queue(&N.dev, &N.tx, 1, 256)) {
        println("ERR net queue setup failed");
        return -1;
    }
    for (int i = 0; i < 6; i++)
        N.mac[i] = N.dev.features & (1ull << VIRTIO_NET_F_MAC) ? mmio_read8(N.dev.devcfg + (uint64_t)i)
                                                               : (uint8_t)(i == 0 ? 0x52 : i);
    N.mtu = N.dev.features & (1ull << VIRTIO_NET_F_MTU) ? mmio_read16(N.dev.devcfg + 10) : 1500;
    uint16_t nrx = N.rx.size < NRX ? N.rx.size : NRX;
    for (uint16_t i = 0; i < nrx; i++)
        post_rx(i);
    tx_nfree = 0;
    uint16_t ntx = N.tx.size < NTX ? N.tx.size : NTX;
    for (uint16_t i = 0; i < ntx; i++)
        tx_free[tx_nfree++] = i;
    virtio_driver_ok(&N.dev);
    vq_kick(&N.rx);
    N.ready = 1;
    idle_hook_add(net_poll);
    return 0;
}

static void reclaim_tx(void)
{
    uint32_t id, len;
    while (vq_poll(&N.tx, &id, &len)) {
        if (id >= N.tx.size)
            continue;
        tx_free[tx_nfree++] = tx_head_buf[id];
        vq_free_chain(&N.tx, (uint16_t)id);
    }
}

/* Queues one frame (without virtio header); returns 0, or -1 if the ring is full. */
static int tx_frame(const uint8_t *frame, unsigned len, int kick)
{
    if (len > TXBUF - NET_HDR)
        return -1;
    if (!tx_nfree)
        reclaim_tx();
    if (!tx_nfree)
        return -1;
    uint16_t b = tx_free[--tx_nfree];
    memset(txbufs[b], 0, NET_HDR);
    memcpy(txbufs[b] + NET_HDR, frame, len);
    uint64_t addr = (uint64_t)(uintptr_t)txbufs[b];
    uint32_t l = NET_HDR + len;
    int wr = 0;
    int head = vq_add(&N.tx, &addr, &l, &wr, 1);
    if (head < 0) {
        tx_free[tx_nfree++] = b;
        return -1;
    }
    tx_head_buf[head] = b;
    N.tx_frames++;
    if (kick)
        vq_kick(&N.tx);
    return 0;
}

static void eth_header(uint8_t *f, const uint8_t *dst, uint16_t type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, N.mac, 6);
    put16(f + 12, type);
}

static void ip_header(uint8_t *ip, uint8_t proto, uint32_t src, uint32_t dst, unsigned payload)
{
    memset(ip, 0, 20);
    ip[0] = 0x45;
    put16(ip + 2, (uint16_t)(20 + payload));
    ip[6] = 0x40;                     /* don't fragment */
    ip[8] = 64;
    ip[9] = proto;
    put32(ip + 12, src);
    put32(ip + 16, dst);
    put16(ip + 10, csum(ip, 20));
}

/* ARP/ICMP/UDP-echo responder; returns 1 if it consumed the frame. */
static int respond(const uint8_t *f, unsigned len)
{
    static uint8_t out[1600];
    if (len < 14 || !N.ip)
        return 0;
    uint16_t type = be16(f + 12);
    if (type == 0x0806 && len >= 42 && be16(f + 20) == 1 && be32(f + 38) == N.ip) {
        eth_header(out, f + 6, 0x0806);
        memcpy(out + 14, f + 14, 6);               /* htype, ptype, hlen, plen */
        put16(out + 20, 2);                        /* reply */
        memcpy(out + 22, N.mac, 6);
        put32(out + 28, N.ip);
        memcpy(out + 32, f + 22, 10);              /* sender hw + ip become target */
        tx_frame(out, 42, 1);
        return 1;
    }
    if (type != 0x0800 || len < 34 || (f[14] >> 4) != 4)
        return 0;
    unsigned ihl = (f[14] & 15) * 4u, tot = be16(f + 16);
    if (ihl < 20 || tot < ihl || 14 + tot > len || be32(f + 30) != N.ip)
        return 0;
    const uint8_t *l4 = f + 14 + ihl;
    unsigned l4len = tot - ihl;
    uint32_t src = be32(f + 26);
    if (f[23] == 1 && l4len >= 8 && l4[0] == 8 && 34 + l4len <= sizeof(out)) {   /* echo request */
        eth_header(out, f + 6, 0x0800);
        ip_header(out + 14, 1, N.ip, src, l4len);
        memcpy(out + 34, l4, l4len);
        out[34] = 0;                                /* echo reply */
        put16(out + 36, 0);
        put16(out + 36, csum(out + 34, l4len));
        tx_frame(out, 34 + l4len, 1);
        return 1;
    }
    if (f[23] == 17 && l4len >= 8 && be16(l4 + 2) == 7 && 34 + l4len <= sizeof(out)) {  /* UDP echo */
        eth_header(out, f + 6, 0x0800);
        ip_header(out + 14, 17, N.ip, src, l4len);
        memcpy(out + 34, l4, l4len);
        put16(out + 34, 7);
        memcpy(out + 36, l4, 2);
        put16(out + 40, 0);                         /* checksum optional over IPv4 */
        tx_frame(out, 34 + l4len, 1);
        return 1;
    }
    return 0;
}

/* Takes one received frame off the rx ring; returns its length or 0. */
static unsigned rx_one(uint8_t **frame, uint16_t *buf)
{
    uint32_t id, len;
    if (!vq_poll(&N.rx, &id, &len))
        return 0;
    if (id >= N.rx.size)
        return 0;
    uint16_t b = rx_head_buf[id];
    vq_free_chain(&N.rx, (uint16_t)id);
    *buf = b;
    *frame = rxbufs[b] + NET_HDR;
    N.rx_frames++;
    return len > NET_HDR && len <= RXBUF ? len - NET_HDR : 0;
}

/* Handles everything that arrived: the responder first, else keep it pending. */
static void net_poll_rx(void)
{
    uint8_t *f;
    uint16_t b;
    int got = 0;
    for (;;) {
        uint32_t before = N.rx.last_used;
        unsigned len = rx_one(&f, &b);
        if (N.rx.last_used == before)
            break;
        got = 1;
        if (len && !respond(f, len)) {
            if (pq_n < PQ) {
                unsigned slot = (pq_head + pq_n++) % PQ;
                memcpy(pq[slot], f, len);
                pq_len[slot] = len;
            } else {
                N.rx_dropped++;
            }
        }
        post_rx(b);
    }
    if (got)
        vq_kick(&N.rx);
}

static void net_poll(void)
{
    if (!N.ready)
        return;
    net_poll_rx();
    reclaim_tx();
}

/* Waits up to ms for an unconsumed frame; returns its length (copied to pending). */
static unsigned wait_pending(uint64_t ms)
{
    uint64_t end = now_us() + ms * 1000;
    for (;;) {
        if (!pending_len && pq_n) {
            memcpy(pending, pq[pq_head], pq_len[pq_head]);
            pending_len = pq_len[pq_head];
            pq_head = (pq_head + 1) % PQ;
            pq_n--;
        }
        if (pending_len || now_us() >= end)
            return pending_len;
        net_poll();
    }
}

static void print_hex_frame(const char *prefix, const uint8_t *f, unsigned len)
{
    static char line[2 * RXBUF + 64];
    size_t o = (size_t)snprintf(line, sizeof(line), "%s len=%u ", prefix, len);
    static const char hx[] = "0123456789abcdef";
    for (unsigned i = 0; i < len && o + 3 < sizeof(line); i++) {
        line[o++] = hx[f[i] >> 4];
        line[o++] = hx[f[i] & 15];
    }
    line[o] = 0;
    println("%s", line);
}

/* ---- ARP resolution and ping ---- */
static int arp_resolve(uint32_t ip, uint8_t *mac, uint64_t ms)
{
    uint8_t req[42];
    eth_header(req, BCAST, 0x0806);
    put16(req + 14, 1);
    put16(req + 16, 0x0800);
    req[18] = 6;
    req[19] = 4;
    put16(req + 20, 1);
    memcpy(req + 22, N.mac, 6);
    put32(req + 28, N.ip);
    memset(req + 32, 0, 6);
    put32(req + 38, ip);
    for (int attempt = 0; attempt < 3; attempt++) {
        tx_frame(req, 42, 1);
        uint64_t end = now_us() + ms * 1000 / 3;
        while (now_us() < end) {
            if (wait_pending(1)) {
                const uint8_t *f = pending;
                if (pending_len >= 42 && be16(f + 12) == 0x0806 && be16(f + 20) == 2 &&
                    be32(f + 28) == ip) {
                    memcpy(mac, f + 22, 6);
                    pending_len = 0;
                    return 0;
                }
                pending_len = 0;
            }
        }
    }
    return -1;
}

static void cmd_ping(uint32_t dst, unsigned count)
{
    uint8_t mac[6];
    char ipbuf[16];
    fmt_ip(ipbuf, dst);
    uint32_t hop = N.gw && ((dst ^ N.ip) >> 8) ? N.gw : dst;   /* /24 unless a gateway says else */
    if (arp_resolve(hop, mac, 1000)) {
        println("ERR net ping: no ARP reply from %s", ipbuf);
        return;
    }
    unsigned replies = 0;
    for (unsigned seq = 1; seq <= count; seq++) {
        uint8_t f[14 + 20 + 8 + 32];
        eth_header(f, mac, 0x0800);
        uint8_t *icmp = f + 34;
        memset(icmp, 0, 40);
        icmp[0] = 8;
        put16(icmp + 4, 0x7467);
        put16(icmp + 6, (uint16_t)seq);
        for (int i = 0; i < 32; i++)
            icmp[8 + i] = (uint8_t)i;
        put16(icmp + 2, csum(icmp, 40));
        ip_header(f + 14, 1, N.ip, dst, 40);
        uint64_t t0 = now_us();
        tx_frame(f, sizeof(f), 1);
        int got = 0;
        while (!got && now_us() - t0 < 1000000) {
            if (!wait_pending(1))
                continue;
            const uint8_t *p = pending;
            if (pending_len >= 42 && be16(p + 12) == 0x0800 && p[23] == 1 && be32(p + 26) == dst) {
                const uint8_t *ic = p + 14 + (p[14] & 15) * 4;
                if (ic + 8 <= p + pending_len && ic[0] == 0 && be16(ic + 6) == seq) {
                    println("NET ping reply from=%s seq=%u time_us=%lu", ipbuf, seq, now_us() - t0);
                    replies++;
                    got = 1;
                }
            }
            pending_len = 0;
        }
        if (!got)
            println("NET ping timeout seq=%u", seq);
    }
    println("NET ping done sent=%u received=%u", count, replies);
}

/* ---- DHCP client (RFC 2131) ---- */
static unsigned dhcp_build(uint8_t *f, uint8_t type, uint32_t xid, uint32_t req_ip, uint32_t server)
{
    memset(f, 0, 342);
    eth_header(f, BCAST, 0x0800);
    uint8_t *udp = f + 34, *b = udp + 8;
    b[0] = 1;                                       /* BOOTREQUEST */
    b[1] = 1;
    b[2] = 6;
    put32(b + 4, xid);
    put16(b + 10, 0x8000);                          /* reply by broadcast: we have no address */
    memcpy(b + 28, N.mac, 6);
    put32(b + 236, 0x63825363);
    uint8_t *o = b + 240;
    *o++ = 53; *o++ = 1; *o++ = type;
    if (req_ip) { *o++ = 50; *o++ = 4; put32(o, req_ip); o += 4; }
    if (server) { *o++ = 54; *o++ = 4; put32(o, server); o += 4; }
    *o++ = 55; *o++ = 4; *o++ = 1; *o++ = 3; *o++ = 6; *o++ = 51;
    *o++ = 255;
    unsigned blen = 300;                            /* minimum BOOTP size */
    put16(udp, 68);
    put16(udp + 2, 67);
    put16(udp + 4, (uint16_t)(8 + blen));
    ip_header(f + 14, 17, 0, 0xFFFFFFFF, 8 + blen);
    return 34 + 8 + blen;
}

struct lease { uint32_t ip, mask, router, dns, server, lease; uint8_t type; };

static int dhcp_parse(const uint8_t *f, unsigned len, uint32_t xid, struct lease *l)
{
    if (len < 14 + 20 + 8 + 240 || be16(f + 12) != 0x0800 || f[23] != 17)
        return -1;
    unsigned ihl = (f[14] & 15) * 4u;
    const uint8_t *udp = f + 14 + ihl;
    if (udp + 8 + 240 > f + len || be16(udp + 2) != 68)
        return -1;
    const uint8_t *b = udp + 8, *end = f + len;
    if (b[0] != 2 || be32(b + 4) != xid || be32(b + 236) != 0x63825363)
        return -1;
    memset(l, 0, sizeof(*l));
    l->ip = be32(b + 16);
    for (const uint8_t *o = b + 240; o < end && *o != 255;) {
        if (*o == 0) { o++; continue; }
        if (o + 2 > end || o + 2 + o[1] > end)
            break;
        uint8_t code = o[0], n = o[1];
        const uint8_t *v = o + 2;
        if (code == 53 && n >= 1) l->type = v[0];
        else if (code == 1 && n >= 4) l->mask = be32(v);
        else if (code == 3 && n >= 4) l->router = be32(v);
        else if (code == 6 && n >= 4) l->dns = be32(v);
        else if (code == 54 && n >= 4) l->server = be32(v);
        else if (code == 51 && n >= 4) l->lease = be32(v);
        o += 2 + n;
    }
    return 0;
}

static int dhcp_exchange(uint8_t type, uint8_t want, uint32_t xid, uint32_t req, uint32_t server,
                         struct lease *l)
{
    static uint8_t f[400];
    for (int attempt = 0; attempt < 4; attempt++) {
        unsigned n = dhcp_build(f, type, xid, req, server);
        tx_frame(f, n, 1);
        uint64_t end = now_us() + 1000000;
        while (now_us() < end) {
            if (!wait_pending(10))
                continue;
            int ok = !dhcp_parse(pending, pending_len, xid, l) && l->type == want;
            pending_len = 0;
            if (ok)
                return 0;
        }
    }
    return -1;
}

static void cmd_dhcp(void)
{
    uint32_t xid = (uint32_t)rdtsc() ^ be32(N.mac + 2);
    struct lease offer, ack;
    uint32_t saved = N.ip;
    N.ip = 0;                                       /* no address until the lease */
    if (dhcp_exchange(1, 2, xid, 0, 0, &offer)) {
        N.ip = saved;
        println("ERR net dhcp: no offer");
        return;
    }
    if (dhcp_exchange(3, 5, xid, offer.ip, offer.server, &ack)) {
        N.ip = saved;
        println("ERR net dhcp: no ack");
        return;
    }
    N.ip = ack.ip;
    N.gw = ack.router;
    char ip[16], mask[16], gw[16], dns[16], srv[16];
    fmt_ip(ip, ack.ip);
    fmt_ip(mask, ack.mask);
    fmt_ip(gw, ack.router);
    fmt_ip(dns, ack.dns);
    fmt_ip(srv, ack.server);
    println("NET dhcp ip=%s mask=%s router=%s dns=%s server=%s lease=%u", ip, mask, gw, dns, srv, ack.lease);
}

/* ---- bench ---- */
static void bench_tx(unsigned size, uint64_t seconds, const uint8_t *dst)
{
    static uint8_t f[TXBUF];
    if (size < 60 || size > TXBUF - NET_HDR) {
        println("ERR net bench frame size must be 60..%u", TXBUF - NET_HDR);
        return;
    }
    eth_header(f, dst, 0x88B5);                     /* IEEE local experimental ethertype */
    for (unsigned i = 14; i < size; i++)
        f[i] = (uint8_t)i;
    uint64_t khz = tsc_khz();
    uint64_t t0 = rdtsc(), end = t0 + seconds * khz * 1000, frames = 0;
    unsigned batch = 0;
    while (rdtsc() < end) {
        if (tx_frame(f, size, 0)) {
            if (batch) {
                vq_kick(&N.tx);
                batch = 0;
            }
            reclaim_tx();
            net_poll();
            continue;
        }
        frames++;
        if (++batch == 32) {
            vq_kick(&N.tx);
            batch = 0;
        }
    }
    if (batch)
        vq_kick(&N.tx);
    /* Count frames the device took, not frames queued: wait (up to a second,
     * inside the measured time) for what is still in the ring. */
    uint64_t drain_end = rdtsc() + khz * 1000;
    while (N.tx.num_free < N.tx.size && rdtsc() < drain_end) {
        reclaim_tx();
        cpu_relax();
    }
    uint64_t left = (uint64_t)(N.tx.size - N.tx.num_free);
    frames = frames > left ? frames - left : 0;
    uint64_t us = (rdtsc() - t0) * 1000 / khz;
    if (!us)
        us = 1;
    uint64_t fps = frames * 1000000 / us;
    uint64_t mbit = frames * size * 8 / us;         /* bits per us = Mbit/s */
    println("NET bench dir=tx size=%u seconds=%lu.%03lu frames=%lu fps=%lu gbps=%lu.%03lu",
            size, us / 1000000, (us / 1000) % 1000, frames, fps, mbit / 1000, mbit % 1000);
}

/* TSO blaster: 64 KiB TCP/IPv4 frames with NEEDS_CSUM and GSO_TCPV4 (virtio
 * 1.2 §5.1.6.2), header and frame in two descriptors, 16 in flight. */
#define TSO_SLOTS 16
#define TSO_FRAME (14 + 20 + 20 + 65495 - 40)

static void bench_tso(uint64_t seconds, const uint8_t *dst)
{
    uint64_t need = (1ull << VIRTIO_NET_F_CSUM) | (1ull << VIRTIO_NET_F_HOST_TSO4);
    if ((N.dev.features & need) != need) {
        println("ERR net bench tso: the device does not offer CSUM and HOST_TSO4");
        return;
    }
    static uint8_t *frames;
    static uint8_t hdrs[TSO_SLOTS][NET_HDR];
    if (!frames && !(frames = ram_alloc((uint64_t)TSO_SLOTS * 65536, 4096))) {
        println("ERR net bench tso: not enough RAM");
        return;
    }
    unsigned len = TSO_FRAME;
    uint32_t src = N.ip ? N.ip : 0x0A000001, dip = 0x0A000002;
    for (unsigned s = 0; s < TSO_SLOTS; s++) {
        uint8_t *f = frames + (uint64_t)s * 65536;
        eth_header(f, dst, 0x0800);
        ip_header(f + 14, 6, src, dip, len - 34);
        uint8_t *tcp = f + 34;
        memset(tcp, 0, 20);
        put16(tcp, 40000);
        put16(tcp + 2, 5001);
        put32(tcp + 4, 1);
        tcp[12] = 5 << 4;
        tcp[13] = 0x18;                              /* PSH, ACK */
        put16(tcp + 14, 65535);
        for (unsigned i = 54; i < len; i++)
            f[i] = (uint8_t)i;
        /* NEEDS_CSUM: the checksum field holds the pseudo-header sum (RFC 793). */
        uint32_t sum = (src >> 16) + (src & 0xFFFF) + (dip >> 16) + (dip & 0xFFFF) + 6 + (len - 34);
        while (sum >> 16)
            sum = (sum & 0xFFFF) + (sum >> 16);
        put16(tcp + 16, (uint16_t)sum);
        uint8_t *h = hdrs[s];
        memset(h, 0, NET_HDR);
        h[0] = 1;                                    /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
        h[1] = 1;                                    /* VIRTIO_NET_HDR_GSO_TCPV4 */
        h[2] = 54;                                   /* hdr_len (le16) */
        h[4] = 1448 & 0xFF; h[5] = 1448 >> 8;        /* gso_size */
        h[6] = 34;                                   /* csum_start */
        h[8] = 16;                                   /* csum_offset */
    }
    static uint16_t head_slot[VQ_MAX];
    static uint8_t is_tso[VQ_MAX];
    unsigned free_slots[TSO_SLOTS], nfree = 0;
    for (unsigned s = 0; s < TSO_SLOTS; s++)
        free_slots[nfree++] = s;
    reclaim_tx();
    uint64_t khz = tsc_khz();
    uint64_t t0 = rdtsc(), end = t0 + seconds * khz * 1000, sent = 0;
    unsigned inflight = 0;
    for (;;) {
        uint64_t now = rdtsc();
        while (nfree && now < end) {
            unsigned s = free_slots[--nfree];
            uint64_t addr[2] = {(uint64_t)(uintptr_t)hdrs[s], (uint64_t)(uintptr_t)(frames + (uint64_t)s * 65536)};
            uint32_t lens[2] = {NET_HDR, len};
            int wr[2] = {0, 0};
            int head = vq_add(&N.tx, addr, lens, wr, 2);
            if (head < 0) {
                free_slots[nfree++] = s;
                break;
            }
            head_slot[head] = (uint16_t)s;
            is_tso[head] = 1;
            inflight++;
            vq_kick(&N.tx);
        }
        if (!inflight)
            break;
        uint32_t id, l;
        while (vq_poll(&N.tx, &id, &l)) {
            if (id >= N.tx.size)
                continue;
            if (is_tso[id]) {
                is_tso[id] = 0;
                free_slots[nfree++] = head_slot[id];
                inflight--;
                sent++;
            } else {
                tx_free[tx_nfree++] = tx_head_buf[id];  /* a responder frame */
            }
            vq_free_chain(&N.tx, (uint16_t)id);
        }
        /* Not net_poll(): its tx reclaim would take our completions. */
        net_poll_rx();
    }
    uint64_t us = (rdtsc() - t0) * 1000 / khz;
    if (!us)
        us = 1;
    uint64_t mbit = sent * (len - 54) * 8 / us;      /* TCP payload bits per us = Mbit/s */
    N.tx_frames += sent;
    println("NET bench dir=tso seconds=%lu.%03lu frames=%lu payload_bytes=%lu gbps=%lu.%03lu",
            us / 1000000, (us / 1000) % 1000, sent, sent * (len - 54), mbit / 1000, mbit % 1000);
}

static void bench_rx(uint64_t seconds)
{
    uint64_t khz = tsc_khz();
    uint64_t t0 = rdtsc(), end = t0 + seconds * khz * 1000, frames = 0, bytes = 0;
    while (rdtsc() < end) {
        uint8_t *f;
        uint16_t b;
        int got = 0;
        for (int i = 0; i < 64; i++) {
            uint32_t before = N.rx.last_used;
            unsigned len = rx_one(&f, &b);
            if (N.rx.last_used == before)
                break;
            if (len && !respond(f, len)) {
                frames++;
                bytes += len;
            }
            post_rx(b);
            got = 1;
        }
        if (got)
            vq_kick(&N.rx);
    }
    uint64_t us = (rdtsc() - t0) * 1000 / khz;
    uint64_t fps = frames * 1000000 / us;
    uint64_t mbit = bytes * 8 / us;
    println("NET bench dir=rx seconds=%lu.%03lu frames=%lu bytes=%lu fps=%lu gbps=%lu.%03lu",
            us / 1000000, (us / 1000) % 1000, frames, bytes, fps, mbit / 1000, mbit % 1000);
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static void cmd_net(int argc, char **argv, const char *rest)
{
    (void)rest;
    uint64_t a[2];
    if (argc >= 2 && !strcmp(argv[1], "use")) {
        if (argc != 3 || parse_u64(argv[2], &a[0])) {
            println("ERR usage: net use N");
            return;
        }
        N.which = (unsigned)a[0];
        N.ready = 0;
        pending_len = 0;
        pq_n = 0;
        if (!net_init())
            println("NET use %u ok", N.which);
        return;
    }
    if (argc < 2) {
        println("ERR usage: net info|use|ip|send|recv|ping|dhcp|bench");
        return;
    }
    if (net_init())
        return;
    const char *sub = argv[1];
    if (!strcmp(sub, "info")) {
        uint16_t st = N.dev.features & (1ull << VIRTIO_NET_F_STATUS) ? mmio_read16(N.dev.devcfg + 6) : 1;
        char ip[16];
        fmt_ip(ip, N.ip);
        /* §5.1.4: le32 speed at 12 and u8 duplex at 16 once SPEED_DUPLEX is negotiated; as
         * Linux's virtnet_update_settings, a speed past INT_MAX or a duplex other than 0 or 1
         * is unknown. */
        char speed[12] = "unknown";
        const char *duplex = "unknown";
        if (N.dev.features & (1ull << VIRTIO_NET_F_SPEED_DUPLEX)) {
            uint32_t mbps = mmio_read32(N.dev.devcfg + 12);
            uint8_t d = mmio_read8(N.dev.devcfg + 16);
            if (mbps <= 0x7fffffffu)
                snprintf(speed, sizeof speed, "%u", mbps);
            duplex = d == 0 ? "half" : d == 1 ? "full" : "unknown";
        }
        println("NET info mac=%02x:%02x:%02x:%02x:%02x:%02x mtu=%u link=%s ip=%s features=0x%lx "
                "rx_frames=%lu tx_frames=%lu rx_dropped=%lu pci=%02x:%02x.%x speed=%s duplex=%s",
                N.mac[0], N.mac[1], N.mac[2], N.mac[3], N.mac[4], N.mac[5], N.mtu,
                st & 1 ? "up" : "down", ip, N.dev.features, N.rx_frames, N.tx_frames,
                N.rx_dropped, N.dev.bus, N.dev.dev, N.dev.fn, speed, duplex);
    } else if (!strcmp(sub, "ip")) {
        uint32_t ip, gw = 0;
        if (argc < 3 || argc > 4 || parse_ip(argv[2], &ip) || (argc == 4 && parse_ip(argv[3], &gw))) {
            println("ERR usage: net ip A.B.C.D [GATEWAY]");
            return;
        }
        N.ip = ip;
        N.gw = gw;
        println("NET ip %s ok", argv[2]);
    } else if (!strcmp(sub, "send")) {
        static uint8_t f[TXBUF];
        size_t n = argc == 3 ? strlen(argv[2]) : 0;
        if (argc != 3 || n % 2 || n / 2 < 14 || n / 2 > TXBUF - NET_HDR) {
            println("ERR usage: net send HEX (14..%u bytes)", TXBUF - NET_HDR);
            return;
        }
        for (size_t i = 0; i < n / 2; i++) {
            int hi = hexval(argv[2][2 * i]), lo = hexval(argv[2][2 * i + 1]);
            if (hi < 0 || lo < 0) {
                println("ERR net send: bad hex");
                return;
            }
            f[i] = (uint8_t)(hi << 4 | lo);
        }
        if (tx_frame(f, (unsigned)(n / 2), 1))
            println("ERR net send: tx ring full");
        else
            println("NET sent len=%u", (unsigned)(n / 2));
    } else if (!strcmp(sub, "recv")) {
        uint64_t ms = 1000, type = 0;
        if (argc > 4 || (argc >= 3 && parse_u64(argv[2], &ms)) || (argc == 4 && parse_u64(argv[3], &type))) {
            println("ERR usage: net recv [MS] [ETHERTYPE]");
            return;
        }
        uint64_t end = now_us() + ms * 1000;
        for (;;) {
            uint64_t now = now_us();
            if (now >= end || !wait_pending((end - now + 999) / 1000)) {
                println("NET recv timeout");
                break;
            }
            int match = !type || (pending_len >= 14 && be16(pending + 12) == type);
            if (match)
                print_hex_frame("NET frame", pending, pending_len);
            pending_len = 0;
            if (match)
                break;
        }
    } else if (!strcmp(sub, "ping")) {
        uint32_t ip;
        a[0] = 1;
        if (argc < 3 || argc > 4 || parse_ip(argv[2], &ip) || (argc == 4 && parse_u64(argv[3], &a[0])) ||
            !a[0] || a[0] > 1000 || !N.ip) {
            println("ERR usage: net ping A.B.C.D [COUNT] (after net ip or net dhcp)");
            return;
        }
        cmd_ping(ip, (unsigned)a[0]);
    } else if (!strcmp(sub, "dhcp")) {
        cmd_dhcp();
    } else if (!strcmp(sub, "bench")) {
        uint8_t dst[6];
        memcpy(dst, BCAST, 6);
        if (argc >= 5 && !strcmp(argv[2], "tx") && !parse_u64(argv[3], &a[0]) &&
            !parse_u64(argv[4], &a[1]) && a[1] && a[1] <= 600 &&
            (argc == 5 || (argc == 6 && !parse_mac(argv[5], dst))))
            bench_tx((unsigned)a[0], a[1], dst);
        else if (argc == 4 && !strcmp(argv[2], "rx") && !parse_u64(argv[3], &a[0]) && a[0] && a[0] <= 600)
            bench_rx(a[0]);
        else if (argc >= 4 && !strcmp(argv[2], "tso") && !parse_u64(argv[3], &a[0]) && a[0] && a[0] <= 600 &&
                 (argc == 4 || (argc == 5 && !parse_mac(argv[4], dst))))
            bench_tso(a[0], dst);
        else
            println("ERR usage: net bench tx SIZE SECONDS [DSTMAC] | rx SECONDS | tso SECONDS [DSTMAC]");
    } else {
        println("ERR unknown net command");
    }
}
COMMAND("net", cmd_net, "net info|use N|ip A [GW]|send HEX|recv [MS] [TYPE]|ping A [N]|dhcp|bench tx SIZE S [MAC]|bench rx S|bench tso S [MAC]");
