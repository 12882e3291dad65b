// Seed for the ELF fuzzer: an executable with function symbols (.symtab and .dynsym), a
// build-id note (gcc's default on Debian) and two USDT probes, one with a semaphore.
// The stapsdt notes are written by hand (the layout of <sys/sdt.h>) so that building the
// seeds needs nothing beyond gcc and binutils.

// PROBE(provider, name, semaphore): a nop at the probe site and its .note.stapsdt entry.
#define PROBE(provider, name, semaphore)                                                   \
    __asm__ volatile("990: nop\n"                                                          \
                     ".pushsection .note.stapsdt,\"\",\"note\"\n"                          \
                     ".balign 4\n"                                                         \
                     ".4byte 992f-991f, 994f-993f, 3\n"                                    \
                     "991: .asciz \"stapsdt\"\n"                                           \
                     "992: .balign 4\n"                                                    \
                     "993: .8byte 990b, _.stapsdt.base, " semaphore "\n"                   \
                     ".asciz \"" provider "\", \"" name "\", \"-4@%edi 8@%rsi\"\n"         \
                     "994: .balign 4\n"                                                    \
                     ".popsection\n"                                                       \
                     ".ifndef _.stapsdt.base\n"                                            \
                     ".pushsection .stapsdt.base,\"aG\",\"progbits\",.stapsdt.base,comdat\n" \
                     ".weak _.stapsdt.base\n"                                              \
                     ".hidden _.stapsdt.base\n"                                            \
                     "_.stapsdt.base: .space 1\n"                                          \
                     ".size _.stapsdt.base, 1\n"                                           \
                     ".popsection\n"                                                       \
                     ".endif\n")

unsigned short seed_tick_semaphore __attribute__((section(".probes"), used));

__attribute__((noinline)) int seed_work(int n) {
    PROBE("seed", "tick", "seed_tick_semaphore");
    return n * 2;
}

__attribute__((noinline)) static int seed_helper(int n) {
    PROBE("seed", "helper", "0");
    return n + 1;
}

int main(int argc, char **argv) {
    (void)argv;
    return seed_work(argc) + seed_helper(argc) > 1000;
}
