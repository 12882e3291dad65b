/* Test process for the ownership check: started as an unprivileged user, it calls owned_fn
 * (libowned.so) an exact number of times, then execs a program that calls it in a loop.
 *   privexec run N EXE   prints its pid; waits for a line; calls owned_fn N times; prints "ran";
 *                        waits for a line; prints "exec_at NS" (CLOCK_MONOTONIC); execs "EXE loop"
 *   privexec loop        prints "euid E", then calls owned_fn about every 100 us for up to 60 s
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

long owned_fn(long x);

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    char line[64];
    if (argc == 2 && strcmp(argv[1], "loop") == 0) {
        printf("euid %d\n", (int)geteuid());
        fflush(stdout);
        long long end = now_ns() + 60LL * 1000000000LL;
        for (long i = 0; now_ns() < end; i++) {
            owned_fn(i);
            usleep(100);
        }
        return 0;
    }
    if (argc != 4 || strcmp(argv[1], "run") != 0) return 2;
    long n = atol(argv[2]);
    printf("%d\n", (int)getpid());
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 3;
    for (long i = 0; i < n; i++) owned_fn(i);
    printf("ran\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 4;
    printf("exec_at %lld\n", now_ns());
    fflush(stdout);
    execl(argv[3], argv[3], "loop", (char *)NULL);
    return 5;
}
