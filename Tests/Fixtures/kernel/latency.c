// Latency fixture (compiled at test time with gcc): functions of known duration, measured by
// the program itself with clock_gettime, so a test can compare uprobed's histogram with them.
//   latency [--wait] [--threads=T] [--busy=N] [--busy-ns=NS] [--sleep1=N] [--sleep10=N]
//           [--recurse=N] [--depth=D] [--exiters=E] [--plain=N] [--delay-us=US]
//           [--long=N] [--long-ms=MS]
// Each of T threads calls lat_busy N times (a busy loop of NS ns), lat_sleep1 and lat_sleep10
// (nanosleep of 1 ms and 10 ms) the given numbers of times, lat_recurse N times at depth D (D nested calls),
// and lat_plain N times (returns at once), sleeping US µs after each lat_plain call (to stretch
// a run in time). E more threads each enter lat_exit_mid, which ends its thread from inside
// (pthread_exit): that call never returns. With --wait the process reads one byte from stdin
// before starting; lat_sleep_long sleeps MS ms (default 1000), N times per thread (so a test can attach first). At the end it prints, per function,
//   NAME calls INNER_P50_NS OUTER_P50_NS
// INNER: measured inside the function's body; OUTER: around the call, by the caller. A probe
// measures from its entry run to its return run, which lies between the two.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long busy_n, busy_ns = 20000, sleep1_n, sleep10_n, recurse_n, depth = 8, plain_n, delay_us, long_n, long_ms = 1000;
static int threads = 1, exiters;
volatile long lat_sink;

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

// Per function: samples of inner and outer durations, appended under a lock.
struct samples { pthread_mutex_t lock; long *inner, *outer; long n, cap; };
static struct samples s_busy = { PTHREAD_MUTEX_INITIALIZER }, s_s1 = { PTHREAD_MUTEX_INITIALIZER },
                      s_s10 = { PTHREAD_MUTEX_INITIALIZER }, s_rec = { PTHREAD_MUTEX_INITIALIZER },
                      s_plain = { PTHREAD_MUTEX_INITIALIZER };
static __thread long inner_last;

static void record(struct samples *s, long inner, long outer) {
    pthread_mutex_lock(&s->lock);
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1024;
        s->inner = realloc(s->inner, s->cap * sizeof(long));
        s->outer = realloc(s->outer, s->cap * sizeof(long));
    }
    s->inner[s->n] = inner;
    s->outer[s->n] = outer;
    s->n++;
    pthread_mutex_unlock(&s->lock);
}

__attribute__((noinline, used)) long lat_busy(long ns) {
    long start = now_ns();
    while (now_ns() - start < ns) lat_sink++;
    inner_last = now_ns() - start;
    return lat_sink;
}

static long sleep_ms(long ms) {
    long start = now_ns();
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {}
    inner_last = now_ns() - start;
    return ms;
}

__attribute__((noinline, used)) long lat_sleep1(void) { return sleep_ms(1); }
__attribute__((noinline, used)) long lat_sleep10(void) { return sleep_ms(10); }
__attribute__((noinline, used)) long lat_sleep_long(void) { return sleep_ms(long_ms); }

__attribute__((noinline, used)) long lat_recurse(long d) {
    __asm__ volatile("");
    if (d <= 1) return 1;
    return lat_recurse(d - 1) + 1;
}

__attribute__((noinline, used)) long lat_plain(long x) { __asm__ volatile(""); lat_sink += x; return x; }

__attribute__((noinline, used)) void lat_exit_mid(void) {
    __asm__ volatile("");
    pthread_exit(NULL);
}

__attribute__((noinline, used)) long lat_never(long x) { __asm__ volatile(""); return x * 3; }

#define TIMED(s, call) do { long t0 = now_ns(); call; long t1 = now_ns(); record(&(s), inner_last, t1 - t0); } while (0)

static void *worker(void *arg) {
    (void)arg;
    for (long i = 0; i < busy_n; i++) TIMED(s_busy, lat_busy(busy_ns));
    for (long i = 0; i < sleep1_n; i++) TIMED(s_s1, lat_sleep1());
    for (long i = 0; i < sleep10_n; i++) TIMED(s_s10, lat_sleep10());
    for (long i = 0; i < long_n; i++) lat_sleep_long();
    for (long i = 0; i < recurse_n; i++) { inner_last = 0; TIMED(s_rec, lat_recurse(depth)); }
    for (long i = 0; i < plain_n; i++) {
        inner_last = 0;
        TIMED(s_plain, lat_plain(i));
        if (delay_us > 0) usleep(delay_us);
    }
    return NULL;
}

static void *exiter(void *arg) { (void)arg; lat_exit_mid(); return NULL; }

static int cmp(const void *a, const void *b) { long x = *(const long *)a, y = *(const long *)b; return (x > y) - (x < y); }
static long median(long *v, long n) { if (n == 0) return 0; qsort(v, n, sizeof(long), cmp); return v[(n - 1) / 2]; }

static void report(const char *name, struct samples *s, long calls) {
    printf("%s %ld %ld %ld\n", name, calls, median(s->inner, s->n), median(s->outer, s->n));
}

int main(int argc, char **argv) {
    int wait = 0;
    for (int a = 1; a < argc; a++) {
        const char *v = strchr(argv[a], '=');
        long x = v ? strtol(v + 1, NULL, 10) : 0;
        if (strcmp(argv[a], "--wait") == 0) wait = 1;
        else if (strncmp(argv[a], "--threads=", 10) == 0) threads = (int)x;
        else if (strncmp(argv[a], "--busy=", 7) == 0) busy_n = x;
        else if (strncmp(argv[a], "--busy-ns=", 10) == 0) busy_ns = x;
        else if (strncmp(argv[a], "--sleep1=", 9) == 0) sleep1_n = x;
        else if (strncmp(argv[a], "--sleep10=", 10) == 0) sleep10_n = x;
        else if (strncmp(argv[a], "--recurse=", 10) == 0) recurse_n = x;
        else if (strncmp(argv[a], "--depth=", 8) == 0) depth = x;
        else if (strncmp(argv[a], "--exiters=", 10) == 0) exiters = (int)x;
        else if (strncmp(argv[a], "--plain=", 8) == 0) plain_n = x;
        else if (strncmp(argv[a], "--delay-us=", 11) == 0) delay_us = x;
        else if (strncmp(argv[a], "--long=", 7) == 0) long_n = x;
        else if (strncmp(argv[a], "--long-ms=", 10) == 0) long_ms = x;
        else { fprintf(stderr, "unknown argument %s\n", argv[a]); return 2; }
    }
    if (threads < 1 || threads > 64 || exiters < 0 || exiters > 64) return 2;
    if (wait) {
        char c;
        if (read(0, &c, 1) < 0) return 3;
    }
    if (argc > 1000) lat_never(1); // keep the call site; never taken
    pthread_t tids[128];
    for (int t = 0; t < threads; t++) pthread_create(&tids[t], NULL, worker, NULL);
    for (int t = 0; t < exiters; t++) pthread_create(&tids[threads + t], NULL, exiter, NULL);
    for (int t = 0; t < threads + exiters; t++) pthread_join(tids[t], NULL);
    report("lat_busy", &s_busy, busy_n * threads);
    report("lat_sleep1", &s_s1, sleep1_n * threads);
    report("lat_sleep10", &s_s10, sleep10_n * threads);
    report("lat_recurse", &s_rec, recurse_n * threads * depth);
    report("lat_plain", &s_plain, plain_n * threads);
    printf("lat_exit_mid %d 0 0\n", exiters);
    return 0;
}
