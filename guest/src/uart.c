/* Console on the 16550 UART at COM1, polled (no interrupts at CPL 3 without
 * an IDT). Output lines are whole: a spinlock keeps APs and the BSP from
 * interleaving characters. */
#include "testguest.h"

#define COM1 0x3F8
#define UART_THR 0
#define UART_RBR 0
#define UART_DLL 0
#define UART_IER 1
#define UART_DLM 1
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_DR   0x01
#define LSR_THRE 0x20

static spinlock_t console_lock;

void spin_lock(spinlock_t *l)
{
    while (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE))
        while (l->locked)
            cpu_relax();
}

void spin_unlock(spinlock_t *l) { __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE); }

void uart_init(void)
{
    outb(COM1 + UART_IER, 0x00);
    outb(COM1 + UART_LCR, 0x80);      /* DLAB: divisor 1 = 115200 baud */
    outb(COM1 + UART_DLL, 0x01);
    outb(COM1 + UART_DLM, 0x00);
    outb(COM1 + UART_LCR, 0x03);      /* 8N1 */
    /* FCR is left alone: QEMU's 16550 empties its receive FIFO when the FIFO
     * enable bit changes, which would drop what the host typed before we got
     * here. Without the FIFO the UART holds one byte and the VMM waits. */
    outb(COM1 + UART_MCR, 0x03);      /* DTR, RTS; OUT2 off: no interrupts */
}

static void uart_putc(char c)
{
    /* A VMM's UART is always ready; the bound keeps a missing UART from hanging us. */
    for (int i = 0; i < 100000 && !(inb(COM1 + UART_LSR) & LSR_THRE); i++)
        cpu_relax();
    outb(COM1 + UART_THR, (uint8_t)c);
}

void println(const char *fmt, ...)
{
    /* One buffer, used under the console lock: long enough for `net recv`'s
     * hex of a 2 KiB frame, and no deep stack on the APs, which print too. */
    static char buf[4 * 1024 + 256];
    va_list ap;
    spin_lock(&console_lock);
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 2, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 3)
        n = (int)sizeof(buf) - 3;
    /* CR LF, as serial consoles send it: a terminal in raw mode (QEMU's
     * -nographic, ours) would otherwise draw a staircase. */
    buf[n++] = '\r';
    buf[n++] = '\n';
    for (int i = 0; i < n; i++)
        uart_putc(buf[i]);
    spin_unlock(&console_lock);
}

size_t uart_readline(char *buf, size_t size)
{
    size_t len = 0;
    int overflow = 0;
    for (;;) {
        while (!(inb(COM1 + UART_LSR) & LSR_DR))
            idle_poll();
        char c = (char)inb(COM1 + UART_RBR);
        if (c == '\n' || c == '\r') {
            if (len == 0 && !overflow)
                continue;        /* blank lines and the \n of \r\n */
            break;
        }
        if (c == 0)
            continue;
        if (len + 1 < size)
            buf[len++] = c;
        else
            overflow = 1;
    }
    buf[len] = 0;
    if (overflow) {
        println("ERR line too long");
        buf[0] = 0;
        return 0;
    }
    return len;
}
