/* Test target for uprobed's integration tests: each function runs exactly as often as argv says.
 *   target A B        calls fn_a A times and fn_b B times, never fn_never
 *   target A B wait   prints its pid, waits for a line on stdin, then runs (so a pid filter can be set first)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PROBED __attribute__((noinline, used))

volatile long sink;
PROBED long fn_a(long x) { sink += x; return x + 1; }
PROBED long fn_b(long x) { sink ^= x; return x * 2; }
PROBED long fn_never(long x) { sink -= x; return x - 1; }

int main(int argc, char **argv) {
    long a = argc > 1 ? atol(argv[1]) : 0;
    long b = argc > 2 ? atol(argv[2]) : 0;
    if (argc > 3 && strcmp(argv[3], "wait") == 0) {
        printf("%d\n", (int)getpid());
        fflush(stdout);
        char line[16];
        if (!fgets(line, sizeof line, stdin)) return 2;
    }
    for (long i = 0; i < a; i++) fn_a(i);
    for (long i = 0; i < b; i++) fn_b(i);
    return 0;
}
