/* Fixture executable for UprobeELF tests: plain functions, an alias, a weak symbol, an IFUNC,
 * USDT probes with a semaphore, and a family of generated functions for glob limits. */
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include <stdio.h>

#define NOINLINE __attribute__((noinline, used))

/* USDT semaphore: lives in .probes, the kernel increments it via ref_ctr_offset. */
unsigned short fixprov_hit_semaphore __attribute__((unused)) __attribute__((section(".probes")));
unsigned short fixprov2_plain_semaphore __attribute__((unused)) __attribute__((section(".probes")));

NOINLINE int fix_add(int a, int b) { return a + b + 1; }
NOINLINE int fix_mul(int a, int b) { return a * b + 2; }

/* Alias: one address, two names. */
int fix_alias(int a, int b) __attribute__((alias("fix_add")));

/* Weak symbol with its own body, plus a strong name at the same address. */
NOINLINE int fix_strong(int x) { return x * 3 + 7; }
int fix_weak(int x) __attribute__((weak, alias("fix_strong")));

/* IFUNC: resolver picks an implementation named like glibc's (__fix_copy_<variant>). */
NOINLINE int __fix_copy_fast(int x) { return x + 100; }
NOINLINE int __fix_copy_slow(int x) { return x + 200; }
static int (*fix_copy_resolver(void))(int) { return __fix_copy_fast; }
int fix_copy(int x) __attribute__((ifunc("fix_copy_resolver")));

/* USDT: two sites of fixprov:hit, both guarded by the semaphore. */
NOINLINE int fix_usdt_a(int x) { if (fixprov_hit_semaphore) STAP_PROBE1(fixprov, hit, x); return x + 1; }
NOINLINE int fix_usdt_b(int x) { if (fixprov_hit_semaphore) STAP_PROBE1(fixprov, hit, x + 1); return x + 2; }
/* A second provider, single site. */
NOINLINE int fix_usdt_c(int x) { DTRACE_PROBE1(fixprov2, plain, x); return x + 3; }

/* Twenty generated functions: gen_10 .. gen_29. */
#define GEN(n) NOINLINE int gen_##n(int x) { return x * n + n; }
GEN(10) GEN(11) GEN(12) GEN(13) GEN(14) GEN(15) GEN(16) GEN(17) GEN(18) GEN(19)
GEN(20) GEN(21) GEN(22) GEN(23) GEN(24) GEN(25) GEN(26) GEN(27) GEN(28) GEN(29)

int main(int argc, char **argv) {
    (void)argv;
    int r = fix_add(argc, 2) + fix_mul(argc, 3) + fix_alias(1, 2) + fix_weak(argc) + fix_copy(argc);
    r += fix_usdt_a(argc) + fix_usdt_b(argc) + fix_usdt_c(argc) + gen_10(argc);
    printf("%d\n", r);
    return 0;
}
