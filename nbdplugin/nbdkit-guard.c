/* A guard preloaded into every node's nbdkit (LD_PRELOAD; scripts/setup.sh builds it).
 *
 * nbdkit 1.32.4 to 1.33.9 (Debian 12 ships 1.32.5) aborts the whole server when a client
 * goes away while two of its replies are under way (Red Hat bug 2173054, fixed upstream
 * in 1.33.10 by 9d82aa4f): the first reply's send() fails, nbdkit marks the connection dead
 * and shuts its socket, setting the socket to -1, and a worker that had already decided to
 * send the next reply then fails `assert (sock >= 0)` in raw_send_socket.  A guest QEMU
 * killed during I/O, or a primary that crashed or gave up on a hung link, took its node
 * down with it that way.
 *
 * Two calls that nbdkit itself makes (not libnbd, gnutls or Python: the caller's address
 * must lie in nbdkit's executable) are changed, and only on a connection that is dying:
 *
 *  - send() to a peer that is gone (EPIPE, ECONNRESET, ETIMEDOUT) reports every byte sent.
 *    The reply is lost either way; the connection is then ended by its reader, which sees
 *    the end of the stream, instead of by the sender while other workers hold replies.
 *  - shutdown(SHUT_WR), which nbdkit calls only to mark a connection dead (a reset or a
 *    cut-short request seen by its reader), first waits SHUTDOWN_GRACE_US, so that workers
 *    already on their way to send a reply do so (into the void, as above) before the
 *    socket becomes -1; workers that finish later see the connection dead and send nothing.
 *
 * Every other call passes through unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#define SHUTDOWN_GRACE_US 200000

static ssize_t (*real_send) (int, const void *, size_t, int);
static int (*real_shutdown) (int, int);

/* The executable segment of the program itself (nbdkit), found at load. */
static uintptr_t nbdkit_start, nbdkit_end;

static int
find_program (struct dl_phdr_info *info, size_t size, void *data)
{
  (void) size;
  (void) data;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
    if (ph->p_type == PT_LOAD && (ph->p_flags & PF_X)) {
      nbdkit_start = info->dlpi_addr + ph->p_vaddr;
      nbdkit_end = nbdkit_start + ph->p_memsz;
    }
  }
  return 1;                     /* the program is listed first: stop there */
}

__attribute__((constructor))
static void
load (void)
{
  real_send = (ssize_t (*) (int, const void *, size_t, int)) dlsym (RTLD_NEXT, "send");
  real_shutdown = (int (*) (int, int)) dlsym (RTLD_NEXT, "shutdown");
  dl_iterate_phdr (find_program, NULL);
}

static int
called_by_nbdkit (const void *caller)
{
  uintptr_t at = (uintptr_t) caller;
  return at >= nbdkit_start && at < nbdkit_end;
}

ssize_t
send (int fd, const void *buf, size_t len, int flags)
{
  ssize_t r = real_send (fd, buf, len, flags);
  if (r == -1 && (errno == EPIPE || errno == ECONNRESET || errno == ETIMEDOUT)
      && called_by_nbdkit (__builtin_return_address (0)))
    return (ssize_t) len;
  return r;
}

int
shutdown (int fd, int how)
{
  if (how == SHUT_WR && called_by_nbdkit (__builtin_return_address (0)))
    usleep (SHUTDOWN_GRACE_US);
  return real_shutdown (fd, how);
}
