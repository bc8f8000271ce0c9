/* The test guest's BSP: boot facts, readiness line, then the command loop.
 *
 * Protocol (one command per line on COM1, answers are whole lines):
 *   echo TEXT   -> TEXT
 *   info        -> INFO key=value ...
 *   poweroff    -> ACPI S5 (prints ERR poweroff failed if still running)
 *   reset       -> FADT reset register, port 0xCF9, i8042, triple fault
 *   help        -> one HELP line per command
 * Anything else -> ERR unknown command
 * Device commands (blk ..., net ...) add themselves with COMMAND(). */
#include "testguest.h"

extern volatile uint64_t pvh_start_info_pa;

static unsigned mem_mib(void)
{
    /* RAM below 1 MiB has holes (EBDA, VGA, BIOS), so round up. */
    return (unsigned)((M.ram_bytes + (1ull << 20) - 1) >> 20);
}

static void cmd_echo(int argc, char **argv, const char *rest)
{
    (void)argc;
    (void)argv;
    println("%s", rest);
}
COMMAND("echo", cmd_echo, "echo TEXT: print TEXT");

static void cmd_info(int argc, char **argv, const char *rest)
{
    (void)argc;
    (void)argv;
    (void)rest;
    char ids[4 * MAX_CPUS + 8];
    size_t o = 0;
    unsigned n = M.ncpus < MAX_CPUS ? M.ncpus : MAX_CPUS;
    for (unsigned i = 0; i < n && o + 12 < sizeof(ids); i++)
        o += (size_t)snprintf(ids + o, sizeof(ids) - o, "%s%u", i ? "," : "", M.apic_ids[i]);
    if (!o)
        snprintf(ids, sizeof(ids), "none");
    println("INFO cpus=%u madt_cpus=%u mem=%u apic_ids=%s bsp_apic=%u lapic=0x%lx rsdp=0x%lx "
            "acpi=%s hw_reduced=%d pm1a_cnt=0x%x sleep_ctl=%u:0x%lx s5=%d reset=%s%u:0x%lx=0x%x ecam=0x%lx",
            M.cpus_up, M.ncpus, mem_mib(), ids, M.bsp_apic_id, M.lapic_base, M.rsdp_pa,
            M.acpi_ok ? "ok" : "none", M.hw_reduced, M.pm1a_cnt, M.sleep_ctl.space,
            M.sleep_ctl.addr, M.s5_found ? M.s5_typ : -1, M.reset_supported ? "" : "unsupported/",
            M.reset_reg.space, M.reset_reg.addr, M.reset_value, M.ecam_base);
}
COMMAND("info", cmd_info, "info: CPUs, memory and ACPI facts");

static void cmd_poweroff(int argc, char **argv, const char *rest)
{
    (void)argc;
    (void)argv;
    (void)rest;
    acpi_poweroff();
    for (volatile int i = 0; i < 10000000; i++)
        cpu_relax();
    println("ERR poweroff failed");
}
COMMAND("poweroff", cmd_poweroff, "poweroff: ACPI S5");

static void cmd_reset(int argc, char **argv, const char *rest)
{
    (void)argc;
    (void)argv;
    (void)rest;
    machine_reset();
}
COMMAND("reset", cmd_reset, "reset: reboot the machine");

static void cmd_help(int argc, char **argv, const char *rest)
{
    (void)argc;
    (void)argv;
    (void)rest;
    for (const struct command *c = __commands_start; c < __commands_end; c++)
        println("HELP %s", c->help);
}
COMMAND("help", cmd_help, "help: list commands");

static void dispatch(char *line)
{
    static char rest[1024];
    char *argv[16];
    int argc = 0;
    char *p = line;
    while (*p == ' ')
        p++;
    /* The text after the command name, spaces kept (tokenizing cuts the line). */
    const char *after = p;
    while (*after && *after != ' ')
        after++;
    if (*after)
        after++;
    size_t n = strlen(after);
    if (n >= sizeof(rest))
        n = sizeof(rest) - 1;
    memcpy(rest, after, n);
    rest[n] = 0;
    while (*p && argc < (int)ARRAY_SIZE(argv)) {
        argv[argc++] = p;
        while (*p && *p != ' ')
            p++;
        if (!*p)
            break;
        *p++ = 0;
        while (*p == ' ')
            p++;
    }
    if (!argc)
        return;
    for (const struct command *c = __commands_start; c < __commands_end; c++) {
        if (!strcmp(c->name, argv[0])) {
            c->run(argc, argv, rest);
            return;
        }
    }
    println("ERR unknown command");
}

NORETURN void bsp_main(void)
{
    uart_init();
    memmap_init(pvh_start_info_pa);
    acpi_init();
    smp_init();
    println("TESTGUEST-READY cpus=%u mem=%u", M.cpus_up, mem_mib());
    static char line[1024];
    for (;;) {
        if (uart_readline(line, sizeof(line)))
            dispatch(line);
    }
}
