/* syncprimary: a benchmark-only prototype of a sync primary's steady state, in C.
 *
 * NOT part of the product.  It measures what a C hot path on the primary would give
 * against repdisk's real (Python) secondary: bench/run.py's `cfast-sync` systems.
 *
 *   nbdkit ./syncprimary.so file=PRIMARY.img secondary='nbd+unix:///replica?socket=S'
 *
 * A guest write: range lock over [offset, offset+count) (two overlapping writes reach
 * both disks in the same order), pwrite() locally, then a synchronous nbd_pwrite() to the
 * secondary on the calling nbdkit worker thread's own libnbd handle (FUA passed through),
 * unlock, return.  So a write crosses no thread on the primary.  Reads are local only.
 * Flush: fdatasync() locally and nbd_flush() on the calling thread's handle.
 *
 * Each worker thread opens its handle lazily; it is closed when the thread exits (nbdkit's
 * worker threads live as long as their client connection) and any left at unload.
 *
 * No fencing, no checkpoints, no failure handling: a failed secondary write fails the
 * guest's write (EIO).  Untagged writes to `replica` are an operator's tool to the
 * secondary (src/repdisk/replication/sessions.py): unfenced, and a secondary that no
 * tagged session wrote to accepts a lone checkpoint.
 *
 * Build: gcc -O2 -fPIC -shared -o syncprimary.so syncprimary.c -lnbd -lpthread
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libnbd.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

static char *filename;
static char *secondary_uri;
static int fd = -1;

/* ---- the secondary: one libnbd handle per nbdkit worker thread ------------------- */

struct link {
  struct nbd_handle *nbd;
  int can_fua;
  struct link *next, *prev;
};

static pthread_key_t link_key;
static pthread_mutex_t links_lock = PTHREAD_MUTEX_INITIALIZER;
static struct link links = { .next = &links, .prev = &links };  /* every open handle */

static void
link_close (struct link *l)
{
  pthread_mutex_lock (&links_lock);
  l->prev->next = l->next;
  l->next->prev = l->prev;
  pthread_mutex_unlock (&links_lock);
  nbd_shutdown (l->nbd, 0);
  nbd_close (l->nbd);
  free (l);
}

static void
link_destructor (void *p)          /* the worker thread exits */
{
  if (p)
    link_close (p);
}

static struct link *
thread_link (void)
{
  struct link *l = pthread_getspecific (link_key);
  if (l)
    return l;
  l = calloc (1, sizeof *l);
  if (!l) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  l->nbd = nbd_create ();
  if (!l->nbd || nbd_connect_uri (l->nbd, secondary_uri) == -1) {
    nbdkit_error ("secondary %s: %s", secondary_uri, nbd_get_error ());
    if (l->nbd)
      nbd_close (l->nbd);
    free (l);
    return NULL;
  }
  if (nbd_is_read_only (l->nbd) == 1) {
    nbdkit_error ("secondary %s is read-only", secondary_uri);
    nbd_close (l->nbd);
    free (l);
    return NULL;
  }
  l->can_fua = nbd_can_fua (l->nbd) == 1;
  pthread_mutex_lock (&links_lock);
  l->next = links.next;
  l->prev = &links;
  links.next->prev = l;
  links.next = l;
  pthread_mutex_unlock (&links_lock);
  pthread_setspecific (link_key, l);
  return l;
}

/* ---- range lock: in-flight writes, overlapping ones wait ------------------------- */

struct range {
  uint64_t start, end;             /* [start, end) */
  struct range *next;
};

static pthread_mutex_t ranges_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ranges_freed = PTHREAD_COND_INITIALIZER;
static struct range *inflight;

static int
overlaps_inflight (uint64_t start, uint64_t end)
{
  for (struct range *r = inflight; r; r = r->next)
    if (r->start < end && start < r->end)
      return 1;
  return 0;
}

static void
range_lock (struct range *me, uint64_t start, uint64_t end)
{
  me->start = start;
  me->end = end;
  pthread_mutex_lock (&ranges_lock);
  while (overlaps_inflight (start, end))
    pthread_cond_wait (&ranges_freed, &ranges_lock);
  me->next = inflight;
  inflight = me;
  pthread_mutex_unlock (&ranges_lock);
}

static void
range_unlock (struct range *me)
{
  pthread_mutex_lock (&ranges_lock);
  for (struct range **p = &inflight; *p; p = &(*p)->next)
    if (*p == me) {
      *p = me->next;
      break;
    }
  pthread_mutex_unlock (&ranges_lock);
  pthread_cond_broadcast (&ranges_freed);   /* no waiters: no syscall */
}

/* ---- the plugin ------------------------------------------------------------------ */

static int
sp_config (const char *key, const char *value)
{
  if (strcmp (key, "file") == 0) {
    free (filename);
    filename = nbdkit_realpath (value);
    return filename ? 0 : -1;
  }
  if (strcmp (key, "secondary") == 0) {
    free (secondary_uri);
    secondary_uri = strdup (value);
    return secondary_uri ? 0 : -1;
  }
  nbdkit_error ("unknown parameter '%s'", key);
  return -1;
}

static int
sp_config_complete (void)
{
  if (!filename || !secondary_uri) {
    nbdkit_error ("file= and secondary= are required");
    return -1;
  }
  return 0;
}

static int
sp_get_ready (void)
{
  fd = open (filename, O_RDWR | O_CLOEXEC);
  if (fd == -1) {
    nbdkit_error ("open %s: %m", filename);
    return -1;
  }
  if (pthread_key_create (&link_key, link_destructor) != 0) {
    nbdkit_error ("pthread_key_create failed");
    return -1;
  }
  return 0;
}

static void
sp_unload (void)
{
  pthread_mutex_lock (&links_lock);
  while (links.next != &links) {
    struct link *l = links.next;
    l->prev->next = l->next;
    l->next->prev = l->prev;
    nbd_shutdown (l->nbd, 0);
    nbd_close (l->nbd);
    free (l);
  }
  pthread_mutex_unlock (&links_lock);
  if (fd >= 0)
    close (fd);
  free (filename);
  free (secondary_uri);
}

static void *
sp_open (int readonly)
{
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t
sp_get_size (void *h)
{
  struct stat st;
  if (fstat (fd, &st) == -1) {
    nbdkit_error ("fstat: %m");
    return -1;
  }
  return st.st_size;
}

static int sp_can_write (void *h) { return 1; }
static int sp_can_flush (void *h) { return 1; }
static int sp_can_fua (void *h) { return NBDKIT_FUA_NATIVE; }
static int sp_can_multi_conn (void *h) { return 0; }

static int
sp_pread (void *h, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  while (count > 0) {
    ssize_t r = pread (fd, buf, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      nbdkit_error ("pread: %m");
      return -1;
    }
    if (r == 0) {
      nbdkit_error ("pread: unexpected end of file");
      errno = EIO;
      return -1;
    }
    buf = (char *) buf + r;
    count -= r;
    offset += r;
  }
  return 0;
}

static int
local_write (const void *buf, uint32_t count, uint64_t offset, int fua)
{
  while (count > 0) {
    ssize_t r = pwrite (fd, buf, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      nbdkit_error ("pwrite: %m");
      return -1;
    }
    buf = (const char *) buf + r;
    count -= r;
    offset += r;
  }
  if (fua && fdatasync (fd) == -1) {
    nbdkit_error ("fdatasync: %m");
    return -1;
  }
  return 0;
}

static int
sp_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  int fua = (flags & NBDKIT_FLAG_FUA) != 0;
  struct link *l = thread_link ();
  struct range me;
  int ret = -1;

  if (!l) {
    errno = EIO;
    return -1;
  }
  range_lock (&me, offset, offset + count);
  if (local_write (buf, count, offset, fua) == -1)
    goto out;
  if (nbd_pwrite (l->nbd, buf, count, offset,
                  fua && l->can_fua ? LIBNBD_CMD_FLAG_FUA : 0) == -1 ||
      (fua && !l->can_fua && nbd_flush (l->nbd, 0) == -1)) {
    nbdkit_error ("secondary pwrite: %s", nbd_get_error ());
    errno = nbd_get_errno () ? nbd_get_errno () : EIO;
    goto out;
  }
  ret = 0;
 out:
  range_unlock (&me);
  return ret;
}

static int
sp_flush (void *h, uint32_t flags)
{
  struct link *l = thread_link ();
  if (fdatasync (fd) == -1) {
    nbdkit_error ("fdatasync: %m");
    return -1;
  }
  if (!l) {
    errno = EIO;
    return -1;
  }
  if (nbd_flush (l->nbd, 0) == -1) {
    nbdkit_error ("secondary flush: %s", nbd_get_error ());
    errno = nbd_get_errno () ? nbd_get_errno () : EIO;
    return -1;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name              = "syncprimary",
  .longname          = "repdisk benchmark-only C sync primary prototype",
  .config            = sp_config,
  .config_complete   = sp_config_complete,
  .config_help       = "file=<PATH> (required) secondary=<NBD URI> (required)",
  .get_ready         = sp_get_ready,
  .unload            = sp_unload,
  .open              = sp_open,
  .get_size          = sp_get_size,
  .can_write         = sp_can_write,
  .can_flush         = sp_can_flush,
  .can_fua           = sp_can_fua,
  .can_multi_conn    = sp_can_multi_conn,
  .pread             = sp_pread,
  .pwrite            = sp_pwrite,
  .flush             = sp_flush,
  .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN (plugin)
