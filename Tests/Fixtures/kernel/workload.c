// Test workload for UprobeKernelTests (compiled at test time with gcc).
//   workload <iterations> [threads] [--wait] [--delay=MICROSECONDS]
// Each of `threads` threads runs `iterations` rounds of: uk_f1 once, uk_f2 twice, uk_f3 three
// times. uk_never is never called. With --wait the process reads one byte from stdin before
// starting (so a test can attach a pid-filtered probe to it first). --delay sleeps that long
// after every round, to stretch a run in time without adding hits.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

volatile long uk_sink;

__attribute__((noinline, used)) long uk_f1(long x) { __asm__ volatile(""); uk_sink += x; return x + 1; }
__attribute__((noinline, used)) long uk_f2(long x) { __asm__ volatile(""); uk_sink ^= x; return x + 2; }
__attribute__((noinline, used)) long uk_f3(long x) { __asm__ volatile(""); uk_sink -= x; return x + 3; }
__attribute__((noinline, used)) long uk_never(long x) { __asm__ volatile(""); uk_sink *= x; return x + 4; }

static long iterations;
static long delay_us;

static void *worker(void *arg) {
    (void)arg;
    for (long i = 0; i < iterations; i++) {
        uk_f1(i);
        uk_f2(i); uk_f2(i);
        uk_f3(i); uk_f3(i); uk_f3(i);
        if (delay_us > 0) {
            struct timespec ts = { delay_us / 1000000, (delay_us % 1000000) * 1000 };
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: workload <iterations> [threads] [--wait]\n"); return 2; }
    iterations = strtol(argv[1], NULL, 10);
    int threads = argc > 2 ? atoi(argv[2]) : 1;
    if (threads < 1 || threads > 64) threads = 1;
    int wait = 0;
    for (int a = 3; a < argc; a++) {
        if (strcmp(argv[a], "--wait") == 0) wait = 1;
        else if (strncmp(argv[a], "--delay=", 8) == 0) delay_us = strtol(argv[a] + 8, NULL, 10);
    }
    if (wait) {
        char c;
        if (read(0, &c, 1) < 0) return 3;
    }
    if (argc > 100) uk_never(1); // keep the call site; never taken
    pthread_t tids[64];
    for (int t = 0; t < threads; t++) pthread_create(&tids[t], NULL, worker, NULL);
    for (int t = 0; t < threads; t++) pthread_join(tids[t], NULL);
    return 0;
}
