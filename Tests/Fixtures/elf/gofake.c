/* Not Go: a C program carrying a .go.buildinfo section, so Go detection can be tested without a
 * Go toolchain. */
__attribute__((used, section(".go.buildinfo"))) static const char buildinfo[32] = "\xff Go buildinf:";
__attribute__((noinline, used)) int go_func(int x) { return x + 1; }
int main(void) { return go_func(0) - 1; }
