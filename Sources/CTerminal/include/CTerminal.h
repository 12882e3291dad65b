#ifndef CTERMINAL_H
#define CTERMINAL_H
/* What `uprobectl top` needs from Linux that Swift's Glibc module does not export:
 * signalfd(2), so SIGINT, SIGTERM, SIGWINCH and SIGTSTP arrive as readable data in the same
 * poll(2) as the keyboard instead of in an async signal handler. */
#include <signal.h>
#include <sys/signalfd.h>
#endif
