/* Functions whose first instruction x86 uprobes cannot probe, beside ordinary ones.
 * Usage: insn N — prints its pid, waits for a line on stdin, then calls fx_add N times,
 * fx_mul 2N times, and each of the unprobeable functions N times. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* vzeroupper (c5 f8 77): VEX-encoded; the kernel accepts a probe here but would emulate the
 * instruction as `ja` (opcode byte 77) instead of executing it, so uprobed refuses it. */
__asm__(".text\n.globl fx_vzeroupper\n.type fx_vzeroupper,@function\n.p2align 4\nfx_vzeroupper:\n"
        "  vzeroupper\n  mov %rdi,%rax\n  ret\n.size fx_vzeroupper,.-fx_vzeroupper\n");
/* vmovd %edi,%xmm0 (c5 f9 6e c7): VEX-encoded; the kernel refuses it (opcode byte 6e is outsb). */
__asm__(".text\n.globl fx_vmovd\n.type fx_vmovd,@function\n.p2align 4\nfx_vmovd:\n"
        "  vmovd %edi,%xmm0\n  vmovd %xmm0,%eax\n  ret\n.size fx_vmovd,.-fx_vmovd\n");
/* lock addq $1,(%rdi) (f0 48 83 07 01): the kernel refuses lock prefixes. */
__asm__(".text\n.globl fx_lock\n.type fx_lock,@function\n.p2align 4\nfx_lock:\n"
        "  lock addq $1,(%rdi)\n  ret\n.size fx_lock,.-fx_lock\n");

/* c5 f8 0a c1: a VEX prefix on an opcode the kernel's decoder does not take with VEX (measured:
 * ENOEXEC). uprobed's own check cannot tell (it has no opcode tables), so only the kernel
 * refuses it, and the attach must find and name it. Never called. */
__asm__(".text\n.globl gap_vex\n.type gap_vex,@function\n.p2align 4\ngap_vex:\n"
        "  .byte 0xc5, 0xf8, 0x0a, 0xc1\n  ret\n.size gap_vex,.-gap_vex\n");

long fx_vzeroupper(long x);
int fx_vmovd(int x);
void fx_lock(long *p);

__attribute__((noipa)) long fx_add(long a, long b) { return a + b; }
__attribute__((noipa)) long fx_mul(long a, long b) { return a * b; }

long counter;

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1;
    /* A static stdin buffer: the first fgets must not call malloc after the probes attach. */
    static char inbuf[64];
    setvbuf(stdin, inbuf, _IOFBF, sizeof inbuf);
    printf("%d\n", getpid());
    fflush(stdout);
    char line[8];
    if (!fgets(line, sizeof line, stdin)) return 2;
    long sum = 0;
    for (long i = 0; i < n; i++) sum += fx_add(i, 1);
    for (long i = 0; i < 2 * n; i++) sum += fx_mul(i, 2);
    int avx = __builtin_cpu_supports("avx");
    for (long i = 0; i < n; i++) {
        if (avx) sum += fx_vzeroupper(i) + fx_vmovd((int)i);
        fx_lock(&counter);
    }
    return counter == n && sum != 0 ? 0 : 1;
}
