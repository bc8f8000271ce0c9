/* Polling virtio-pci driver core: device discovery through the modern
 * vendor capabilities (virtio 1.2 §4.1.4), the initialization sequence of
 * §3.1.1, and split virtqueues (§2.7) driven without interrupts: the driver
 * publishes avail entries, writes the queue index to the notify address and
 * polls used->idx. */
#include "virtio.h"

#define PCI_VENDOR_VIRTIO 0x1AF4
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR    3
#define CAP_DEVICE 4

/* Common configuration structure offsets (§4.1.4.3). */
#define CC_DFSELECT   0x00
#define CC_DF         0x04
#define CC_GFSELECT   0x08
#define CC_GF         0x0C
#define CC_NUMQ       0x12
#define CC_STATUS     0x14
#define CC_Q_SELECT   0x16
#define CC_Q_SIZE     0x18
#define CC_Q_MSIX     0x1A
#define CC_Q_ENABLE   0x1C
#define CC_Q_NOFF     0x1E
#define CC_Q_DESC     0x20
#define CC_Q_AVAIL    0x28
#define CC_Q_USED     0x30

static uint64_t bar_address(unsigned b, unsigned d, unsigned f, unsigned bar)
{
    if (bar > 5)
        return 0;
    uint32_t lo = pci_read32(b, d, f, 0x10 + 4 * bar);
    if (lo & 1)
        return 0;                                   /* I/O BAR: not for modern virtio */
    uint64_t addr = lo & ~0xFull;
    if (((lo >> 1) & 3) == 2 && bar < 5)
        addr |= (uint64_t)pci_read32(b, d, f, 0x10 + 4 * (bar + 1)) << 32;
    return addr;
}

/* Modern device ids are 0x1040 + type; transitional ones 0x1000 + n (n = 1 net, 2 blk). */
static int type_matches(uint16_t id, unsigned type)
{
    if (id == 0x1040 + type)
        return 1;
    return (type == 1 && id == 0x1000) || (type == 2 && id == 0x1001);
}

int virtio_find(unsigned type, unsigned n, struct virtio_dev *d)
{
    unsigned seen = 0;
    for (unsigned dev = 0; dev < 32; dev++) {
        for (unsigned fn = 0; fn < 8; fn++) {
            uint32_t id = pci_read32(0, dev, fn, 0);
            if ((id & 0xFFFF) == 0xFFFF) {
                if (fn == 0)
                    break;
                continue;
            }
            if ((id & 0xFFFF) == PCI_VENDOR_VIRTIO && type_matches((uint16_t)(id >> 16), type)) {
                if (seen++ != n)
                    continue;
                memset(d, 0, sizeof(*d));
                d->bus = 0;
                d->dev = dev;
                d->fn = fn;
                d->device_id = (uint16_t)(id >> 16);
                if (!(pci_read16(0, dev, fn, 0x06) & 0x10))
                    return -1;                       /* no capability list */
                pci_assign_bars(0, dev, fn);
                unsigned cap = pci_read8(0, dev, fn, 0x34) & 0xFC;
                for (int guard = 0; cap && guard < 48; guard++) {
                    if (pci_read8(0, dev, fn, cap) == 0x09) {
                        uint8_t cfg_type = pci_read8(0, dev, fn, cap + 3);
                        uint8_t bar = pci_read8(0, dev, fn, cap + 4);
                        uint32_t off = pci_read32(0, dev, fn, cap + 8);
                        uint64_t base = bar_address(0, dev, fn, bar);
                        uint64_t addr = base ? base + off : 0;
                        if (cfg_type == CAP_COMMON && !d->common)
                            d->common = addr;
                        else if (cfg_type == CAP_NOTIFY && !d->notify_base) {
                            d->notify_base = addr;
                            d->notify_mult = pci_read32(0, dev, fn, cap + 16);
                        } else if (cfg_type == CAP_ISR && !d->isr)
                            d->isr = addr;
                        else if (cfg_type == CAP_DEVICE && !d->devcfg)
                            d->devcfg = addr;
                    }
                    cap = pci_read8(0, dev, fn, cap + 1) & 0xFC;
                }
                if (!d->common || !d->notify_base || !d->devcfg)
                    return -2;                       /* not modern, or BARs unassigned */
                /* Memory space and bus mastering on. */
                uint16_t cmd = pci_read16(0, dev, fn, 0x04);
                pci_write16(0, dev, fn, 0x04, (uint16_t)(cmd | 0x06));
                return 0;
            }
            if (fn == 0 && !(pci_read8(0, dev, 0, 0x0E) & 0x80))
                break;                               /* single-function device */
        }
    }
    return -1;
}

int virtio_negotiate(struct virtio_dev *d, uint64_t wanted)
{
    mmio_write8(d->common + CC_STATUS, 0);
    for (int i = 0; i < 1000000 && mmio_read8(d->common + CC_STATUS); i++)
        cpu_relax();
    mmio_write8(d->common + CC_STATUS, VIRTIO_STATUS_ACK);
    mmio_write8(d->common + CC_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER);
    mmio_write32(d->common + CC_DFSELECT, 0);
    uint64_t offered = mmio_read32(d->common + CC_DF);
    mmio_write32(d->common + CC_DFSELECT, 1);
    offered |= (uint64_t)mmio_read32(d->common + CC_DF) << 32;
    if (!(offered & (1ull << VIRTIO_F_VERSION_1)))
        return -1;
    d->features = offered & (wanted | (1ull << VIRTIO_F_VERSION_1));
    mmio_write32(d->common + CC_GFSELECT, 0);
    mmio_write32(d->common + CC_GF, (uint32_t)d->features);
    mmio_write32(d->common + CC_GFSELECT, 1);
    mmio_write32(d->common + CC_GF, (uint32_t)(d->features >> 32));
    uint8_t st = VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK;
    mmio_write8(d->common + CC_STATUS, st);
    if (!(mmio_read8(d->common + CC_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
        mmio_write8(d->common + CC_STATUS, VIRTIO_STATUS_FAILED);
        return -2;
    }
    d->num_queues = mmio_read16(d->common + CC_NUMQ);
    return 0;
}

/* Ring memory: one page-aligned area per queue slot we support. */
/* Never freed: a re-initialised device gets fresh rings (after its reset). */
#define MAX_QUEUES 32
static uint8_t ring_mem[MAX_QUEUES][3][4096 * 2] __attribute__((aligned(4096)));
static unsigned rings_used;

int virtio_setup_queue(struct virtio_dev *d, struct virtqueue *q, uint16_t index, uint16_t size)
{
    if (rings_used >= MAX_QUEUES)
        return -1;
    mmio_write16(d->common + CC_Q_SELECT, index);
    uint16_t max = mmio_read16(d->common + CC_Q_SIZE);
    if (!max)
        return -2;
    if (size > max)
        size = max;
    if (size > VQ_MAX)
        size = VQ_MAX;
    /* Sizes are powers of two for split rings (§2.7). */
    while (size & (size - 1))
        size &= (uint16_t)(size - 1);
    uint8_t (*mem)[4096 * 2] = ring_mem[rings_used++];
    memset(mem, 0, sizeof(ring_mem[0]));
    q->index = index;
    q->size = size;
    q->desc = (volatile struct vring_desc *)mem[0];
    q->avail = (volatile uint16_t *)mem[1];
    q->used = (volatile uint8_t *)mem[2];
    q->avail_idx = 0;
    q->last_used = 0;
    for (uint16_t i = 0; i < size; i++)
        q->desc[i].next = (uint16_t)(i + 1);
    q->free_head = 0;
    q->num_free = size;
    mmio_write16(d->common + CC_Q_SIZE, size);
    mmio_write16(d->common + CC_Q_MSIX, 0xFFFF);    /* no interrupts: we poll */
    mmio_write64(d->common + CC_Q_DESC, (uint64_t)(uintptr_t)q->desc);
    mmio_write64(d->common + CC_Q_AVAIL, (uint64_t)(uintptr_t)q->avail);
    mmio_write64(d->common + CC_Q_USED, (uint64_t)(uintptr_t)q->used);
    uint16_t noff = mmio_read16(d->common + CC_Q_NOFF);
    q->notify_addr = d->notify_base + (uint64_t)noff * d->notify_mult;
    mmio_write16(d->common + CC_Q_ENABLE, 1);
    return 0;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    mmio_write8(d->common + CC_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER |
                                           VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
}

int vq_add(struct virtqueue *q, const uint64_t *addr, const uint32_t *len, const int *writable, int n)
{
    if (n <= 0 || n > q->num_free)
        return -1;
    uint16_t head = q->free_head, i = head, last = head;
    for (int k = 0; k < n; k++) {
        q->desc[i].addr = addr[k];
        q->desc[i].len = len[k];
        q->desc[i].flags = (uint16_t)((writable[k] ? VRING_DESC_F_WRITE : 0) |
                                      (k + 1 < n ? VRING_DESC_F_NEXT : 0));
        last = i;
        i = q->desc[i].next;
    }
    q->free_head = q->desc[last].next;
    q->num_free = (uint16_t)(q->num_free - n);
    q->avail[2 + (q->avail_idx % q->size)] = head;
    /* The ring entry must be visible before the index that publishes it (§2.7.13). */
    barrier();
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
    return head;
}

void vq_kick(struct virtqueue *q)
{
    /* The idx store must reach memory before the device sees the notify. */
    mb();
    mmio_write16(q->notify_addr, q->index);
}

int vq_poll(struct virtqueue *q, uint32_t *id, uint32_t *len)
{
    volatile uint16_t *used_idx = (volatile uint16_t *)(q->used + 2);
    if (*used_idx == q->last_used)
        return 0;
    barrier();
    volatile struct vring_used_elem *e =
        (volatile struct vring_used_elem *)(q->used + 4) + (q->last_used % q->size);
    *id = e->id;
    *len = e->len;
    q->last_used++;
    return 1;
}

void vq_free_chain(struct virtqueue *q, uint16_t head)
{
    if (head >= q->size)
        return;
    uint16_t i = head, n = 1;
    while ((q->desc[i].flags & VRING_DESC_F_NEXT) && n < q->size) {
        i = q->desc[i].next;
        n++;
    }
    q->desc[i].next = q->free_head;
    q->free_head = head;
    q->num_free = (uint16_t)(q->num_free + n);
}
