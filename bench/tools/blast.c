/* Frame blaster for bench/net.py: sends SIZE-byte Ethernet frames (ethertype
 * 0x88b5, broadcast) out of IFNAME through an AF_PACKET socket for SECONDS,
 * then prints how many it handed to the kernel. Run only inside a network
 * namespace the benchmark made: the frames never leave it. */
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: blast IFNAME SIZE SECONDS\n");
        return 2;
    }
    int size = atoi(argv[2]);
    double secs = atof(argv[3]);
    if (size < 60 || size > 9000) return 2;
    int s = socket(AF_PACKET, SOCK_RAW, htons(0x88b5));
    if (s < 0) { perror("socket"); return 1; }
    int one = 1;
    setsockopt(s, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
    struct sockaddr_ll sll = {0};
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = if_nametoindex(argv[1]);
    sll.sll_protocol = htons(0x88b5);
    if (!sll.sll_ifindex || bind(s, (struct sockaddr *)&sll, sizeof sll) < 0) { perror("bind"); return 1; }
    unsigned char frame[9000];
    memset(frame, 0, sizeof frame);
    memset(frame, 0xff, 6);
    unsigned char src[6] = {0x02, 0, 0, 0xbe, 0xec, 1};
    memcpy(frame + 6, src, 6);
    frame[12] = 0x88; frame[13] = 0xb5;
    long sent = 0, failed = 0;
    double end = now() + secs;
    while (1) {
        for (int i = 0; i < 256; i++) {
            if (send(s, frame, size, 0) == size) sent++; else failed++;
        }
        if (now() >= end) break;
    }
    printf("BLAST sent=%ld failed=%ld\n", sent, failed);
    return 0;
}
