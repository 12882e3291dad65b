// USDT-style semaphore fixture: `usdt` waits for one byte on stdin, then prints the value of
// its semaphore (a uprobe with ref_ctr_offset on it increments it while attached) and calls
// the probe site once.
#include <stdio.h>
#include <unistd.h>

// A writable, file-backed (not .bss) counter, like SystemTap's .probes semaphores.
__attribute__((used, section(".probes"))) volatile unsigned short uk_sema = 0;

__attribute__((noinline, used)) int uk_site(int x) { __asm__ volatile(""); return x + 1; }

int main(void) {
    char c;
    if (read(0, &c, 1) < 0) return 3;
    printf("%u\n", (unsigned)uk_sema);
    fflush(stdout);
    return uk_site(0) - 1;
}
