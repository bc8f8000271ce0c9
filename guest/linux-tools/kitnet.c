/*
 * kitnet: TCP bulk sender and sink for the appliance Linux kit.
 *
 *   kitnet send HOST PORT BYTES [--bs N]   connect, write BYTES in N-byte write()s
 *   kitnet recv PORT [--bs N]              accept one connection, read it to EOF
 *
 * busybox nc moves 1 KiB per poll()/read()/write() round, so a guest sending
 * through it is bound by its own per-KiB system call and per-segment cost
 * (each 1 KiB write leaves as its own TCP segment when the peer ACKs fast),
 * not by the NIC. kitnet writes and reads large buffers (default 256 KiB), as
 * a real bulk transfer does, so the stack builds TSO frames and the NIC's
 * bulk path is what gets measured.
 *
 * The sender half-closes after the last byte and waits for the peer's EOF, so
 * its time covers delivery, not just queueing into the socket buffer. The sink
 * closes when it sees EOF. Each prints one machine-readable line:
 *
 *   KITNET dir=send|recv bytes=N seconds=S gbps=G
 *
 * Exit status: 0 on success, 1 on a socket error ("KITNET error=…"), 2 on bad
 * arguments.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_BS (16u << 20)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void usage(void)
{
    fprintf(stderr, "usage: kitnet send HOST PORT BYTES [--bs N] | kitnet recv PORT [--bs N]\n");
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

static int fail(const char *what)
{
    printf("KITNET error=%s:%s\n", what, strerror(errno));
    return 1;
}

static void report(const char *dir, unsigned long long n, double secs)
{
    printf("KITNET dir=%s bytes=%llu seconds=%.3f gbps=%.3f\n", dir, n, secs,
           secs > 0 ? (double)n * 8 / secs / 1e9 : 0.0);
}

static int do_send(const char *host, unsigned port, unsigned long long total, size_t bs)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
        usage();
    char *buf = calloc(1, bs);
    if (!buf)
        return fail("calloc");
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return fail("socket");
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        return fail("connect");
    double t0 = now_s();
    unsigned long long sent = 0;
    while (sent < total) {
        size_t want = total - sent < bs ? (size_t)(total - sent) : bs;
        ssize_t n = write(fd, buf, want);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail("write");
        }
        sent += (unsigned long long)n;
    }
    if (shutdown(fd, SHUT_WR) < 0)
        return fail("shutdown");
    /* The peer closes once it has read everything. */
    for (;;) {
        ssize_t n = read(fd, buf, bs);
        if (n == 0)
            break;
        if (n < 0 && errno != EINTR)
            return fail("read");
    }
    report("send", sent, now_s() - t0);
    close(fd);
    return 0;
}

static int do_recv(unsigned port, size_t bs)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    char *buf = malloc(bs);
    if (!buf)
        return fail("malloc");
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0)
        return fail("socket");
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0)
        return fail("bind");
    if (listen(ls, 1) < 0)
        return fail("listen");
    int fd = accept(ls, NULL, NULL);
    if (fd < 0)
        return fail("accept");
    close(ls);
    double t0 = 0;
    unsigned long long got = 0;
    for (;;) {
        ssize_t n = read(fd, buf, bs);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail("read");
        }
        if (!got)
            t0 = now_s();
        got += (unsigned long long)n;
    }
    report("recv", got, got ? now_s() - t0 : 0);
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    size_t bs = 256u << 10;
    int nargs = argc;
    if (argc >= 4 && strcmp(argv[argc - 2], "--bs") == 0) {
        unsigned long long v = parse_num(argv[argc - 1]);
        if (v == 0 || v > MAX_BS)
            usage();
        bs = (size_t)v;
        nargs -= 2;
    }
    if (nargs == 5 && strcmp(argv[1], "send") == 0) {
        unsigned long long port = parse_num(argv[3]);
        if (port == 0 || port > 65535)
            usage();
        return do_send(argv[2], (unsigned)port, parse_num(argv[4]), bs);
    }
    if (nargs == 3 && strcmp(argv[1], "recv") == 0) {
        unsigned long long port = parse_num(argv[2]);
        if (port == 0 || port > 65535)
            usage();
        return do_recv((unsigned)port, bs);
    }
    usage();
    return 2;
}
