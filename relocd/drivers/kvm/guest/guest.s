# relocd's KVM guest: a tiny 64-bit program that dirties its own memory.
#
# The VMM loads it at CODE_ADDR and starts every vCPU directly in long mode
# (identity-mapped page tables, flat segments; see vm.py) with rdi = vCPU index.
# vCPU 0 runs the workload described in the control page (layout.py); the
# other vCPUs only report idle ticks.  Every data page it writes carries the
# page invariant the daemon checks (layout.check_invariant):
#
#   word 0 = pfn, word 1 = generation g, words 2 and 511 = c(pfn, g),
#   words 3..510 = 0,
#   c(pfn, g) = ((pfn * K1) ^ g) * K2   (mod 2^64)
#   gentab[pfn - data_start] = g   (written after the page)
#
# ctl.inflight holds the pfn being written (0 when none) so a checker that
# stops the guest between the page and its table entry knows which page to
# skip.  After each batch the guest OUTs the batch size to PORT_BATCH; the
# VMM sleeps there to hold the configured rate.  The guest uses no stack,
# no interrupts, and no memory besides the control page, the generation
# table and the data pages.

    .intel_syntax noprefix
    .code64

    .set CTL, 0x2000
    .set CTL_DATA_START, 3*8
    .set CTL_NDATA, 4*8
    .set CTL_GENTAB, 5*8
    .set CTL_KIND, 6*8
    .set CTL_BATCH, 7*8
    .set CTL_HOT, 8*8
    .set CTL_RNG, 9*8
    .set CTL_CURSOR, 10*8
    .set CTL_TICKS, 11*8
    .set CTL_WRITTEN, 12*8
    .set CTL_INFLIGHT, 13*8

    .set KIND_IDLE, 0
    .set KIND_HOTSET, 2
    .set KIND_SWEEP, 3

    .set PORT_BATCH, 0x10
    .set PORT_IDLE, 0x11
    .set PORT_AP_IDLE, 0x12


    .globl _start
_start:
    test rdi, rdi
    jnz ap_idle
    mov r15, CTL

main_loop:
    mov r14, [r15 + CTL_BATCH]
    cmp qword ptr [r15 + CTL_KIND], KIND_IDLE
    je idle_tick

batch_loop:
    test r14, r14
    jz batch_done
    cmp qword ptr [r15 + CTL_KIND], KIND_SWEEP
    je pick_sweep

    # xorshift64 step; the state lives in guest memory so it migrates
    mov rax, [r15 + CTL_RNG]
    mov rdx, rax
    shl rdx, 13
    xor rax, rdx
    mov rdx, rax
    shr rdx, 7
    xor rax, rdx
    mov rdx, rax
    shl rdx, 17
    xor rax, rdx
    mov [r15 + CTL_RNG], rax
    mov rbx, [r15 + CTL_NDATA]
    cmp qword ptr [r15 + CTL_KIND], KIND_HOTSET
    jne 1f
    mov rbx, [r15 + CTL_HOT]
1:
    xor edx, edx
    div rbx
    mov r13, rdx
    jmp write_page

pick_sweep:
    mov r13, [r15 + CTL_CURSOR]
    lea rax, [r13 + 1]
    cmp rax, [r15 + CTL_NDATA]
    jb 2f
    xor eax, eax
2:
    mov [r15 + CTL_CURSOR], rax

write_page:
    # r13 = data index, r12 = pfn, r11 = new generation, rsi = gentab
    mov r12, [r15 + CTL_DATA_START]
    add r12, r13
    mov [r15 + CTL_INFLIGHT], r12
    mov rsi, [r15 + CTL_GENTAB]
    mov r11, [rsi + r13*8]
    inc r11
    movabs rax, 0x9E3779B97F4A7C15  # K1
    imul rax, r12
    xor rax, r11
    movabs rdx, 0xBF58476D1CE4E5B9  # K2
    imul rax, rdx
    # header words and the last word; the rest of the page stays zero.
    # Each instruction counts: some KVM implementations emulate the guest.
    mov rdi, r12
    shl rdi, 12
    mov [rdi], r12
    mov [rdi + 8], r11
    mov [rdi + 16], rax
    mov [rdi + 4088], rax
    mov [rsi + r13*8], r11
    inc qword ptr [r15 + CTL_WRITTEN]
    mov qword ptr [r15 + CTL_INFLIGHT], 0
    dec r14
    jmp batch_loop

batch_done:
    inc qword ptr [r15 + CTL_TICKS]
    mov rax, [r15 + CTL_BATCH]
    mov dx, PORT_BATCH
    out dx, eax
    jmp main_loop

idle_tick:
    inc qword ptr [r15 + CTL_TICKS]
    xor eax, eax
    mov dx, PORT_IDLE
    out dx, eax
    jmp main_loop

ap_idle:
    mov dx, PORT_AP_IDLE
    out dx, eax
    jmp ap_idle
