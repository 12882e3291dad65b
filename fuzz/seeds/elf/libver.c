// Seed for the ELF fuzzer: a shared library with GNU symbol versions (.gnu.version,
// .gnu.version_d), a symbol defined under two versions, an IFUNC and a plain export.
// Built with libver.map as the version script.
int seed_add_v1(int x) { return x + 1; }
int seed_add_v2(int x) { return x + 2; }
__asm__(".symver seed_add_v1, seed_add@SEED_1");
__asm__(".symver seed_add_v2, seed_add@@SEED_2");

static int seed_mul_generic(int x) { return x * 3; }
static int (*seed_mul_resolver(void))(int) { return seed_mul_generic; }
int seed_mul(int x) __attribute__((ifunc("seed_mul_resolver")));

int seed_plain(int x) { return seed_mul(x) + 1; }
