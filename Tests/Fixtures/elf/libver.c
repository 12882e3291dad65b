/* Fixture shared library with symbol versions: vfunc@VER_1 (old) and vfunc@@VER_2 (default),
 * plus an unversioned-looking plain export lib_plain (in VER_1). */
#define NOINLINE __attribute__((noinline, used))

NOINLINE int vfunc_v1(int x) { return x + 1; }
NOINLINE int vfunc_v2(int x) { return x + 2; }
__asm__(".symver vfunc_v1, vfunc@VER_1");
__asm__(".symver vfunc_v2, vfunc@@VER_2");

NOINLINE int lib_plain(int x) { return x * 5; }
