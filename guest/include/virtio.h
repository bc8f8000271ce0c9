/* PCI configuration access and a polling virtio-pci (modern) driver core:
 * split virtqueues per virtio 1.2 §2.7, transport per §4.1. */
#ifndef TESTGUEST_VIRTIO_H
#define TESTGUEST_VIRTIO_H

#include "testguest.h"

/* ---- PCI (type 1 configuration mechanism on 0xCF8/0xCFC) ---- */
uint32_t pci_read32(unsigned bus, unsigned dev, unsigned fn, unsigned off);
uint16_t pci_read16(unsigned bus, unsigned dev, unsigned fn, unsigned off);
uint8_t pci_read8(unsigned bus, unsigned dev, unsigned fn, unsigned off);
void pci_write32(unsigned bus, unsigned dev, unsigned fn, unsigned off, uint32_t v);
void pci_write16(unsigned bus, unsigned dev, unsigned fn, unsigned off, uint16_t v);
/* Gives unassigned memory BARs addresses (firmware-less machines); enables decode. */
void pci_assign_bars(unsigned bus, unsigned dev, unsigned fn);

#define VIRTIO_STATUS_ACK         1
#define VIRTIO_STATUS_DRIVER      2
#define VIRTIO_STATUS_DRIVER_OK   4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_FAILED      0x80
#define VIRTIO_F_VERSION_1        32

#define VRING_DESC_F_NEXT  1
#define VRING_DESC_F_WRITE 2

struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct vring_used_elem { uint32_t id, len; };

#define VQ_MAX 256

struct virtqueue {
    uint16_t index, size;
    volatile struct vring_desc *desc;
    volatile uint16_t *avail;     /* flags, idx, ring[size], used_event */
    volatile uint8_t *used;       /* flags, idx, ring[size] of used_elem, avail_event */
    uint64_t notify_addr;
    uint16_t avail_idx;           /* next free avail slot (free-running) */
    uint16_t last_used;
    uint16_t free_head, num_free;
};

struct virtio_dev {
    unsigned bus, dev, fn;
    uint16_t device_id;
    uint64_t common, notify_base, isr, devcfg;
    uint32_t notify_mult;
    uint64_t features;
    uint16_t num_queues;
};

/* Finds the n-th virtio device (0-based) of the given type (2 = block, 1 = net). */
int virtio_find(unsigned type, unsigned n, struct virtio_dev *d);
/* Resets, negotiates (wanted & offered, plus VERSION_1) and leaves status at FEATURES_OK. */
int virtio_negotiate(struct virtio_dev *d, uint64_t wanted);
int virtio_setup_queue(struct virtio_dev *d, struct virtqueue *q, uint16_t index, uint16_t size);
void virtio_driver_ok(struct virtio_dev *d);

/* Adds a chain of n buffers (addr, len, device-writable?) and returns its head, or -1. */
int vq_add(struct virtqueue *q, const uint64_t *addr, const uint32_t *len, const int *writable, int n);
void vq_kick(struct virtqueue *q);
/* Returns 1 and the used element if the device returned a chain, else 0. */
int vq_poll(struct virtqueue *q, uint32_t *id, uint32_t *len);
/* Returns a chain's descriptors to the free list. */
void vq_free_chain(struct virtqueue *q, uint16_t head);

#endif
