/* libowned.so: the probed function of the ownership tests. A library, so that it is mapped
 * by every image the test process execs (the case is libc in passwd). */
volatile long owned_sink;
__attribute__((noinline, used)) long owned_fn(long x) { owned_sink += x; return x + 1; }
