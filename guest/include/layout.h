/* Addresses and selectors shared by the assembly entry code and C. */
#ifndef TESTGUEST_LAYOUT_H
#define TESTGUEST_LAYOUT_H

#define IMAGE_BASE        0x100000   /* the ELF is linked and loaded at 1 MiB */
#define TRAMPOLINE_ADDR   0x8000     /* AP real-mode entry page (SIPI vector 0x08) */
#define MAX_CPUS          64
#define STACK_SIZE        16384      /* per CPU */
#define KSTACK_SIZE       1024       /* per CPU, only used while parked at CPL 0 */

/* GDT selectors. 0x18/0x20/0x28 follow the SYSRET layout (STAR[63:48] = 0x18). */
#define SEL_KCODE64       0x08
#define SEL_KDATA         0x10
#define SEL_UCODE32       0x18
#define SEL_UDATA         0x20
#define SEL_UCODE64       0x28
#define SEL_KCODE32       0x30
#define SEL_TSS           0x38
#define SEL_AP_TSS        0x48
#define USER_CS           (SEL_UCODE64 | 3)
#define USER_DS           (SEL_UDATA | 3)

/* RFLAGS at CPL 3: IOPL 3 (port I/O without exits to a #GP), IF clear (no IDT). */
#define USER_RFLAGS       0x3002

#endif
