/*
 * Boot path of the test guest: PVH 32-bit entry -> long mode -> CPL 3.
 *
 * Everything before the iretq runs at CPL 0, which a PVM host executes in
 * KVM's instruction emulator at ~1 us per instruction, so this path is kept
 * to a few dozen instructions: the page tables are built by the assembler
 * (initialised data, loaded with the image), not by a loop at run time. From
 * CPL 3 on, code runs natively.
 *
 * PVH boot ABI (Xen's docs/misc/pvh.pandoc): 32-bit protected mode, paging
 * off, flat 4 GiB CS/DS, %ebx = physical address of struct hvm_start_info.
 */
#include "layout.h"

#define PTE_P   0x001
#define PTE_RW  0x002
#define PTE_US  0x004
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS  0x080
#define PAGE_FLAGS (PTE_P | PTE_RW | PTE_US)

#define MSR_EFER  0xC0000080
#define EFER_LME  0x100

/* The PVH note: type 18 is XEN_ELFNOTE_PHYS32_ENTRY, the 32-bit entry point.
 * The descriptor is 8 bytes, as Linux writes it and as QEMU reads it. */
    .section .note.Xen, "a"
    .balign 4
    .long 4, 8, 18
    .asciz "Xen"
    .balign 4
    .quad pvh_entry

    .section .text.entry, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    cli
    cld
    movl %ebx, pvh_start_info_pa
    movl $ap_tmp_stack_top, %esp
    lgdt gdt_desc
    lidt idt_null      /* any exception is a triple fault: a clean VM shutdown */
    /* TSS descriptor base (bits 0-15 at +2, 16-23 at +4, 24-31 at +7). */
    movl $tss0, %eax
    movw %ax, gdt_tss + 2
    shrl $16, %eax
    movb %al, gdt_tss + 4
    movb %ah, gdt_tss + 7
    movl $tss0, %eax
    movw %ax, gdt_ap_tss + 2
    shrl $16, %eax
    movb %al, gdt_ap_tss + 4
    movb %ah, gdt_ap_tss + 7
    call enter_long_mode_32
    ljmp $SEL_KCODE64, $bsp_long

/* CR4.PAE, CR3, EFER.LME, then CR0.PG|PE: the SDM's sequence for entering
 * IA-32e mode (vol. 3A 10.8.5). Shared by the BSP and the APs. */
enter_long_mode_32:
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ret

    .code64
bsp_long:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $SEL_TSS, %ax
    ltr %ax
    leaq kstacks + KSTACK_SIZE(%rip), %rsp
    leaq stacks + STACK_SIZE(%rip), %rax
    xorl %edi, %edi
    /* iretq frame: SS, RSP, RFLAGS, CS, RIP. */
    /* Raise IOPL before the iretq too: PVM's emulated iretq was seen to keep
     * the current IOPL rather than the one in the frame. */
    pushq $USER_RFLAGS
    popfq
    pushq $USER_DS
    pushq %rax
    pushq $USER_RFLAGS
    pushq $USER_CS
    leaq bsp_user(%rip), %rax
    pushq %rax
    iretq

/* First CPL 3 code on the BSP: clear .bss (the stacks live outside it), then C. */
bsp_user:
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    rep stosq
    xorl %edi, %edi
    call bsp_main
    ud2

/*
 * AP trampoline: copied to TRAMPOLINE_ADDR by the BSP; the SIPI starts the AP
 * here in real mode with CS = TRAMPOLINE_ADDR >> 4, IP = 0.
 */
    .code16
    .globl ap_trampoline, ap_trampoline_end
ap_trampoline:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_gdt_desc - ap_trampoline
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_KCODE32, $ap_entry32
    .balign 4
ap_gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:

    .code32
ap_entry32:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $ap_tmp_stack_top, %esp
    call enter_long_mode_32
    ljmp $SEL_KCODE64, $ap_long

    .code64
ap_long:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $SEL_AP_TSS, %ax
    ltr %ax
    /* The AP reports from CPL 0 and then halts there with interrupts off:
     * under PVM a CPL 3 vCPU cannot come back to CPL 0 without the PVM
     * paravirtual ABI, and parking at CPL 3 would mean a spin loop that
     * burns a host core per AP. The report is a few hundred instructions,
     * emulated or not. */
    movq ap_boot_stack(%rip), %rsp
    movl ap_boot_index(%rip), %edi
    call ap_main
1:  cli
    hlt
    jmp 1b

/* ---------------------------------------------------------------------- */
    .data
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x10 kernel data */
    .quad 0x00cffa000000ffff    /* 0x18 user code, 32-bit (SYSRET layout only) */
    .quad 0x00cff2000000ffff    /* 0x20 user data */
    .quad 0x00affa000000ffff    /* 0x28 user code, 64-bit */
    .quad 0x00cf9a000000ffff    /* 0x30 kernel code, 32-bit (AP trampoline) */
gdt_tss:
    .quad 0x0000890000002068    /* 0x38 BSP TSS (limit covers the bitmap), base filled in */
    .quad 0
    .globl gdt_ap_tss
gdt_ap_tss:
    .quad 0x0000890000002068    /* 0x48 AP TSS: the same TSS, re-armed by the BSP per AP */
    .quad 0
gdt_end:
idt_null:
    .word 0
    .quad 0
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt

/* The TSS carries an all-zero I/O permission bitmap (every port allowed).
 * PVM runs CPL 3 with the hardware IOPL forced to 0 and emulates each port
 * access after the #GP, checking the guest's TSS bitmap (as the SDM's I/O
 * permission check does), so this bitmap, not RFLAGS.IOPL, is what lets CPL 3
 * code use in/out there. All CPUs share it through their own descriptors. */
    .balign 16
tss0:
    .long 0
    .quad kstacks + KSTACK_SIZE /* RSP0 */
    .fill 102 - 12, 1, 0
    .word 104                   /* I/O map base */
    .fill 8192, 1, 0
    .byte 0xff                  /* the bitmap's required terminator */
tss0_end:

    .globl pvh_start_info_pa, ap_boot_stack, ap_boot_index
    .balign 8
pvh_start_info_pa: .quad 0
ap_boot_stack:     .quad 0
ap_boot_index:     .long 0

/* Identity map of the first 8 GiB with 2 MiB pages, all user-accessible (the
 * guest's code runs at CPL 3). 3-4 GiB is the MMIO hole: uncached. */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl pml4
pml4:
    .quad pdpt + PAGE_FLAGS
    .fill 511, 8, 0
pdpt:
    .set i, 0
    .rept 8
    .quad pd + i * 4096 + PAGE_FLAGS
    .set i, i + 1
    .endr
    .fill 504, 8, 0
pd:
    .set i, 0
    .rept 4096
    .quad (i << 21) | PAGE_FLAGS | PTE_PS | ((((i >= 1536) & (i < 2048)) & 1) * (PTE_PCD | PTE_PWT))
    .set i, i + 1
    .endr

    .section .stacks, "aw", @nobits
    .balign 4096
    .globl stacks, kstacks
stacks:
    .space STACK_SIZE * MAX_CPUS
kstacks:
    .space KSTACK_SIZE * MAX_CPUS
ap_tmp_stack:
    .space 256
ap_tmp_stack_top:
