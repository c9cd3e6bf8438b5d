/* repdisk-fast: an nbdkit filter that serves a node's steady-state writes in C.
 *
 *   nbdkit --filter=.../repdisk-fast.so python nbdplugin/repdisk.py role=primary ...
 *
 * The plugin (Python) decides everything; this filter only carries out one route of a
 * gate (src/repdisk/replication/writepath.py, secondary.py) without the GIL and without a
 * thread hand-off:
 *   - a sync primary's FORWARD: a guest write is written locally and then to the
 *     secondary on the calling nbdkit worker's own libnbd connection, in the primary's
 *     writer session, before it is acknowledged;
 *   - an async primary's WRITE_BACK: a guest write is written locally, its range is put
 *     in the slot's mark log, and the forwarder is woken through the slot's eventfd; the
 *     plugin moves the marks into its dirty map before it reads the map (writeback.py);
 *   - a secondary's COPY_BEFORE_WRITE with nothing left to copy: a replica pwrite of the
 *     current writer session whose clusters are all in the hidden overlay is written to
 *     the disk (a replica slot, below).
 * src/repdisk/replication/fastpath.py is its Python side.
 *
 * Slots.  A slot is one primary disk's write path.  The plugin tells it where to write
 * (the local disk's fd, and for sync the secondary's export URI with the forwarder's
 * session tag) and arms it only while the gate gives the slot's route and nothing needs
 * the plugin's own range locks (no hold, no copy, no verify); otherwise it is disarmed,
 * its connections kept while the URI stays (a checkpoint's hold) and closed when it
 * changes or goes (a new session, a stopped link).  A mode change (OFF <-> ARMED) takes
 * effect only when no write of the slot is under way, whichever path it took: arrivals
 * wait meanwhile.  So a write never runs beside one of the other path, except those an
 * armed slot hands to the plugin itself.
 *
 * Cells.  A connection is bound at open to its export's cell (the plugin's Export); a
 * cell names the slot of the device behind the export now (-1: none), so a promotion that
 * switches the export's target reaches connections already open.
 *
 * An armed sync slot's writes, under the filter's range lock (overlapping writes reach
 * both disks in the same order):
 *   - pwrite: the guard (below) is checked; local pwrite (+ fdatasync for FUA); the same
 *     request to the secondary, waited for up to the timeout; the guard again; reply.
 *   - zero, trim, and any write whose guard check fails: handed to the plugin, which
 *     does all of it its way (still under the filter's range lock).
 *   - a secondary that fails, refuses or does not answer in time: the plugin's failure
 *     callback marks the range dirty and degrades the link (which disarms the slot), and
 *     the write is handed to the plugin, which writes it again and judges the guard.
 * An armed write-back slot's writes take no range lock (the plugin's write-back takes
 * none: a mark made after the write, a piece cleared before it is read):
 *   - pwrite: the guard is checked; local pwrite (+ fdatasync for FUA); the mark; reply.
 *   - zero, trim, a failed guard check, a full mark log, or a write that would take the
 *     unsent bytes past the plugin's max-lag (repdisk_fast_lag): handed to the plugin,
 *     which waits for the lag its way.
 * An armed replica slot's writes take no range lock (the plugin's take one only to
 * order a cluster's copy before its write, and these clusters are copied):
 *   - pwrite of a connection bound to the slot's writer session (the fence's serial,
 *     repdisk_fast_session), every cluster of it set in the hidden overlay's bitmap: the
 *     local pwrite (+ fdatasync for FUA); reply.  Until it leaves it is "direct": a new
 *     session's admission waits for the direct writes to end.
 *   - anything else (a cluster to copy, another session, zero, trim, a failed write):
 *     handed to the plugin.
 *   The plugin sets a bit after its cluster's copy and clears bits only while the slot
 *     is disarmed (a checkpoint, a failover), which it is whenever the stage is not
 *     RUNNING.
 * Reads, flushes and everything else go straight to the plugin.
 *
 * The guard: the plugin publishes whether guest writes may be acknowledged without it
 * (not suspended, judging, fenced or refused) and until when (its isolation guard's last
 * contact plus its timeout, CLOCK_MONOTONIC ns).  Past either, writes go to the plugin.
 *
 * Locks: a slot's `lock` guards everything in it but the counters and `signalled`
 * (atomics), `ranges` (`ranges_lock`) and the mark log and lag (`marks_lock`);
 * `cells_lock` guards the tables' growth.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-filter.h>

#define MAX_SLOTS 256
#define MAX_CELLS 1024
#define MAX_MARKS 16384             /* a write-back slot's mark log: 256 KiB */

enum mode { OFF, ARMED };
enum kind { SYNC, WRITE_BACK, REPLICA };

struct handle {                     /* one connection to the secondary */
  struct nbd_handle *nbd;
  unsigned gen;                     /* the arming it was made for */
  struct handle *next;
};

struct range {                      /* a write under way: [start, end) */
  uint64_t start, end;
  struct range *next;
};

/* Called (with the GIL taken by ctypes) when the secondary failed a write: mark
 * [offset, offset+count) dirty and degrade the link; errno is the failure's. */
typedef void (*failure_fn) (int slot, uint64_t offset, uint32_t count, int err,
                            const char *why);

struct slot {
  pthread_mutex_t lock;
  pthread_cond_t quiet;             /* inflight or direct fell to 0, or the mode changed */
  enum kind kind;
  enum mode mode, want;
  unsigned inflight;                /* writes of this slot in the filter, either path */
  unsigned gen;                     /* grows at every arming */
  int fd;
  char *uri;
  int64_t timeout_ns;
  struct handle *idle;              /* connections of `gen` not in use */
  failure_fn failed;
  pthread_mutex_t ranges_lock;
  pthread_cond_t ranges_freed;
  struct range *ranges;
  uint64_t writes, bytes;           /* atomics: writes and bytes acknowledged here */
  /* A write-back slot (wake_fd >= 0): the forwarder's eventfd and whether it was written
   * since the plugin last rearmed it (an atomic); under marks_lock, the marks the plugin
   * has not taken and their bytes, the bytes not yet sent (the plugin's count of its
   * dirty map when it last told, plus every mark since) and the most it allows. */
  int wake_fd;
  int signalled;
  pthread_mutex_t marks_lock;
  uint64_t (*marks)[2];
  unsigned nmarks;
  uint64_t marked, unsent, max_lag;
  /* A replica slot: the hidden overlay's bitmap (one bit a cluster of 1 << shift bytes;
   * the plugin's, read here only while armed), the writer session whose connections may
   * write here (its fence's serial; -1 none) and, under lock, how many writes are in C. */
  const unsigned char *bits;
  unsigned shift;
  int64_t session;
  unsigned direct;
};

static struct slot slots[MAX_SLOTS];
static int nslots;
static int cells[MAX_CELLS];        /* cell -> slot (-1: none); atomics */
static int ncells;
static pthread_mutex_t cells_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread int bound_cell = -1;  /* set by the plugin's open, read by ours */
static __thread int64_t bound_session = -1;

/* The guard, published by the plugin (atomics). */
static int guard_blocked;
static int64_t guard_deadline_ns = INT64_MAX;

static int64_t
now_ns (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* CLOCK_REALTIME timeout seconds from now, for pthread_cond_timedwait. */
static struct timespec
deadline_in (double timeout)
{
  struct timespec until;
  clock_gettime (CLOCK_REALTIME, &until);
  int64_t ns = until.tv_nsec + (int64_t) (timeout * 1e9);
  until.tv_sec += ns / 1000000000;
  until.tv_nsec = ns % 1000000000;
  return until;
}

static bool
guard_ok (void)
{
  return !__atomic_load_n (&guard_blocked, __ATOMIC_ACQUIRE)
    && now_ns () < __atomic_load_n (&guard_deadline_ns, __ATOMIC_ACQUIRE);
}

/* ---- the plugin's side (called through ctypes; every call is short) ---------------- */

/* A new slot of `kind`, disarmed; -1 if the table is full. */
static int
new_slot (enum kind kind)
{
  pthread_mutex_lock (&cells_lock);
  int s = nslots < MAX_SLOTS ? nslots++ : -1;
  pthread_mutex_unlock (&cells_lock);
  if (s < 0)
    return -1;
  struct slot *sl = &slots[s];
  pthread_mutex_init (&sl->lock, NULL);
  pthread_cond_init (&sl->quiet, NULL);
  pthread_mutex_init (&sl->ranges_lock, NULL);
  pthread_cond_init (&sl->ranges_freed, NULL);
  pthread_mutex_init (&sl->marks_lock, NULL);
  sl->kind = kind;
  sl->fd = -1;
  sl->wake_fd = -1;
  sl->max_lag = UINT64_MAX;
  sl->session = -1;
  return s;
}

/* A new primary slot, disarmed: a sync one (failed: its failure callback), or with
 * wake_fd >= 0 a write-back one that wakes the forwarder through that eventfd.  -1: the
 * table is full, or no memory for a mark log. */
int
repdisk_fast_slot (failure_fn failed, int wake_fd)
{
  uint64_t (*marks)[2] = NULL;
  if (wake_fd >= 0 && !(marks = calloc (MAX_MARKS, sizeof *marks)))
    return -1;
  int s = new_slot (wake_fd >= 0 ? WRITE_BACK : SYNC);
  if (s < 0) {
    free (marks);
    return -1;
  }
  slots[s].failed = failed;
  slots[s].wake_fd = wake_fd;
  slots[s].marks = marks;
  return s;
}

/* A new replica slot, disarmed: a secondary's disk, whose hidden overlay's bitmap is
 * `bits` (clusters of 1 << shift bytes; it must stay valid while the slot is armed).
 * -1: the table is full. */
int
repdisk_fast_replica_slot (const unsigned char *bits, unsigned shift)
{
  int s = new_slot (REPLICA);
  if (s >= 0) {
    slots[s].bits = bits;
    slots[s].shift = shift;
  }
  return s;
}

/* A replica slot's connections of writer session `session` (bound at open) may write in C
 * from now on, no other's; returns once no write is in C any more (1), or after timeout
 * (0).  The plugin calls it while its fence holds off every write it serves. */
int
repdisk_fast_session (int slot, int64_t session, double timeout)
{
  struct slot *sl = &slots[slot];
  struct timespec until = deadline_in (timeout);
  pthread_mutex_lock (&sl->lock);
  sl->session = session;
  while (sl->direct > 0)
    if (pthread_cond_timedwait (&sl->quiet, &sl->lock, &until) == ETIMEDOUT)
      break;
  int done = sl->direct == 0;
  pthread_mutex_unlock (&sl->lock);
  return done;
}

/* Move up to `most` marks (offset, length) into out; how many.  The plugin calls it before
 * it reads its dirty map, under the map's lock. */
int
repdisk_fast_take_marks (int slot, uint64_t (*out)[2], int most)
{
  struct slot *sl = &slots[slot];
  pthread_mutex_lock (&sl->marks_lock);
  unsigned n = sl->nmarks < (unsigned) most ? sl->nmarks : (unsigned) most;
  sl->nmarks -= n;
  memcpy (out, sl->marks + sl->nmarks, n * sizeof *out);
  for (unsigned i = 0; i < n; i++)
    sl->marked -= out[i][1];
  pthread_mutex_unlock (&sl->marks_lock);
  return (int) n;
}

/* The forwarder is about to look at the dirty map: a mark made from now on wakes it. */
void
repdisk_fast_rearm (int slot)
{
  __atomic_store_n (&slots[slot].signalled, 0, __ATOMIC_SEQ_CST);
}

/* The plugin's dirty map holds `dirty` unsent bytes now, and writes wait (the plugin's
 * way) beyond `max_lag` unsent: a write that would take the unsent bytes past it is
 * handed to the plugin.  (A feed between the plugin's count and this call makes the sum
 * short until the next call: the bound is the plugin's, this only keeps C writes near.) */
void
repdisk_fast_lag (int slot, uint64_t dirty, uint64_t max_lag)
{
  struct slot *sl = &slots[slot];
  pthread_mutex_lock (&sl->marks_lock);
  sl->unsent = dirty + sl->marked;
  sl->max_lag = max_lag;
  pthread_mutex_unlock (&sl->marks_lock);
}

int
repdisk_fast_cell (void)
{
  pthread_mutex_lock (&cells_lock);
  int c = ncells < MAX_CELLS ? ncells++ : -1;
  if (c >= 0)
    cells[c] = -1;
  pthread_mutex_unlock (&cells_lock);
  return c;
}

void
repdisk_fast_cell_set (int cell, int slot)
{
  __atomic_store_n (&cells[cell], slot, __ATOMIC_RELEASE);
}

/* The connection being opened on this thread serves `cell`, in writer session `session`
 * (a replica slot's; -1 for none). */
void
repdisk_fast_bind (int cell, int64_t session)
{
  bound_cell = cell;
  bound_session = session;
}

void
repdisk_fast_guard (int blocked, int64_t deadline_ns)
{
  __atomic_store_n (&guard_deadline_ns, deadline_ns, __ATOMIC_RELEASE);
  __atomic_store_n (&guard_blocked, blocked, __ATOMIC_RELEASE);
}

static void
close_idle (struct slot *sl)        /* lock held */
{
  while (sl->idle) {
    struct handle *h = sl->idle;
    sl->idle = h->next;
    nbd_close (h->nbd);
    free (h);
  }
}

/* lock held, inflight == 0.  An arming of a write-back slot also rearms its wake-up: the
 * forwarder it now serves is a new one, and an earlier one may have taken the last
 * wake-up and failed before it rearmed. */
static void
apply_want (struct slot *sl)
{
  if (sl->mode != sl->want) {
    sl->mode = sl->want;
    if (sl->mode == ARMED)
      __atomic_store_n (&sl->signalled, 0, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast (&sl->quiet);
  }
}

/* Where the slot writes (the local disk's fd; a sync slot's secondary export URI with its
 * session tag: NULL for none, which disarms it) and whether it is armed.  Connections
 * made for another fd or URI close (those under way when they are given back).  An
 * arming takes effect at once if no write is under way, else when the last one leaves
 * (repdisk_fast_wait waits for it).  0, or -1 (ENOMEM: nothing changed). */
int
repdisk_fast_set (int slot, int fd, const char *uri, double timeout, int armed)
{
  struct slot *sl = &slots[slot];
  char *copy = NULL;
  if (uri && !(copy = strdup (uri)))
    return -1;
  pthread_mutex_lock (&sl->lock);
  if (sl->fd != fd || !sl->uri != !uri || (uri && strcmp (sl->uri, uri))) {
    sl->gen++;
    close_idle (sl);
    free (sl->uri);
    sl->uri = copy;
    sl->fd = fd;
    copy = NULL;
  }
  free (copy);
  sl->timeout_ns = (int64_t) (timeout * 1e9);
  sl->want = armed && (uri || sl->kind != SYNC) ? ARMED : OFF;
  if (sl->inflight == 0)
    apply_want (sl);
  pthread_mutex_unlock (&sl->lock);
  return 0;
}

/* Wait up to timeout for the slot's mode to be the one last set; 1 if it is. */
int
repdisk_fast_wait (int slot, double timeout)
{
  struct slot *sl = &slots[slot];
  struct timespec until = deadline_in (timeout);
  pthread_mutex_lock (&sl->lock);
  while (sl->mode != sl->want && sl->inflight > 0)
    if (pthread_cond_timedwait (&sl->quiet, &sl->lock, &until) == ETIMEDOUT)
      break;
  if (sl->inflight == 0)
    apply_want (sl);
  int done = sl->mode == sl->want;
  pthread_mutex_unlock (&sl->lock);
  return done;
}

/* out: [armed, writes, bytes, connections idle] */
void
repdisk_fast_stats (int slot, uint64_t out[4])
{
  struct slot *sl = &slots[slot];
  uint64_t idle = 0;
  pthread_mutex_lock (&sl->lock);
  out[0] = sl->mode == ARMED;
  for (struct handle *h = sl->idle; h; h = h->next)
    idle++;
  pthread_mutex_unlock (&sl->lock);
  out[1] = __atomic_load_n (&sl->writes, __ATOMIC_RELAXED);
  out[2] = __atomic_load_n (&sl->bytes, __ATOMIC_RELAXED);
  out[3] = idle;
}

/* ---- a write's way through the filter ---------------------------------------------- */

struct conn {
  int cell;
  int64_t session;
};

static struct slot *
slot_of (struct conn *c)
{
  int s = c->cell < 0 ? -1 : __atomic_load_n (&cells[c->cell], __ATOMIC_ACQUIRE);
  return s < 0 ? NULL : &slots[s];
}

/* Count a write of connection c in; a pending mode change is applied first.  Whether
 * the slot is armed (a replica slot: and c is of its writer session, the write then
 * counted as direct until it leaves or goes to the plugin), and (*fd) its local disk's
 * fd now: a later change of it (a disarming) leaves the file open until this write has
 * left (the plugin waits for that before it closes it). */
static bool
enter (struct slot *sl, const struct conn *c, int *fd)
{
  pthread_mutex_lock (&sl->lock);
  while (sl->mode != sl->want && sl->inflight > 0)
    pthread_cond_wait (&sl->quiet, &sl->lock);
  if (sl->inflight == 0)
    apply_want (sl);
  sl->inflight++;
  bool armed = sl->mode == ARMED;
  if (sl->kind == REPLICA) {
    armed = armed && c->session >= 0 && c->session == sl->session;
    sl->direct += armed;
  }
  *fd = sl->fd;
  pthread_mutex_unlock (&sl->lock);
  return armed;
}

/* A replica slot's direct write is done in C, or goes to the plugin (whose fence may be
 * waiting in repdisk_fast_session for the C writes to drain): lock held. */
static void
end_direct (struct slot *sl)
{
  if (--sl->direct == 0)
    pthread_cond_broadcast (&sl->quiet);
}

/* A write leaves; `direct`: a replica slot's, still counted as direct. */
static void
leave (struct slot *sl, bool direct)
{
  pthread_mutex_lock (&sl->lock);
  if (direct)
    end_direct (sl);
  if (--sl->inflight == 0) {
    apply_want (sl);
    pthread_cond_broadcast (&sl->quiet);
  }
  pthread_mutex_unlock (&sl->lock);
}

static void
range_lock (struct slot *sl, struct range *me, uint64_t start, uint64_t end)
{
  me->start = start;
  me->end = end;
  pthread_mutex_lock (&sl->ranges_lock);
  for (;;) {
    struct range *r = sl->ranges;
    while (r && !(r->start < end && start < r->end))
      r = r->next;
    if (!r)
      break;
    pthread_cond_wait (&sl->ranges_freed, &sl->ranges_lock);
  }
  me->next = sl->ranges;
  sl->ranges = me;
  pthread_mutex_unlock (&sl->ranges_lock);
}

static void
range_unlock (struct slot *sl, struct range *me)
{
  pthread_mutex_lock (&sl->ranges_lock);
  for (struct range **p = &sl->ranges; *p; p = &(*p)->next)
    if (*p == me) {
      *p = me->next;
      break;
    }
  pthread_cond_broadcast (&sl->ranges_freed);
  pthread_mutex_unlock (&sl->ranges_lock);
}

/* One round of driving h: wait (up to the deadline) for what libnbd waits for, then tell
 * it.  0, or -1 with errno: ENOTCONN (dead or closed), ETIMEDOUT, or poll's. */
static int
drive (struct nbd_handle *h, int64_t deadline)
{
  unsigned dir = nbd_aio_get_direction (h);
  short events = (dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0)
    | (dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0);
  int64_t left = deadline - now_ns ();
  if (!events) {
    errno = ENOTCONN;
    return -1;
  }
  if (left <= 0) {
    errno = ETIMEDOUT;
    return -1;
  }
  struct pollfd p = { .fd = nbd_aio_get_fd (h), .events = events };
  if (poll (&p, 1, (int) (left / 1000000) + 1) == -1 && errno != EINTR)
    return -1;
  if (p.revents & POLLOUT)
    nbd_aio_notify_write (h);
  if (p.revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL))
    nbd_aio_notify_read (h);
  return 0;
}

/* Drive h until cookie completes or the deadline passes; 0, or -1 with errno set. */
static int
await (struct nbd_handle *h, int64_t cookie, int64_t deadline)
{
  for (;;) {
    int r = nbd_aio_command_completed (h, cookie);
    if (r == 1)
      return 0;
    if (r == -1) {
      errno = nbd_get_errno () ? nbd_get_errno () : EIO;
      return -1;
    }
    if (drive (h, deadline) == -1)
      return -1;
  }
}

/* A connection of the slot's current arming: an idle one, or a new one. */
static struct handle *
take (struct slot *sl, int64_t deadline, const char **why)
{
  pthread_mutex_lock (&sl->lock);
  struct handle *h = sl->idle;
  if (h)
    sl->idle = h->next;
  unsigned gen = sl->gen;
  bool gone = !h && !sl->uri;
  char *uri = h || gone ? NULL : strdup (sl->uri);
  pthread_mutex_unlock (&sl->lock);
  if (h)
    return h;
  if (gone) {                       /* the link left UP while this write was under way */
    *why = "the link to the secondary went down";
    return NULL;
  }
  if (!uri || !(h = calloc (1, sizeof *h)) || !(h->nbd = nbd_create ())) {
    *why = "out of memory";
    free (uri);
    free (h);
    return NULL;
  }
  h->gen = gen;
  if (strncmp (uri, "nbds", 4) == 0)   /* TLS credentials named in the URI: ours */
    nbd_set_uri_allow_local_file (h->nbd, true);
  int r = nbd_aio_connect_uri (h->nbd, uri);
  while (r != -1 && !nbd_aio_is_ready (h->nbd))
    r = drive (h->nbd, deadline);
  free (uri);
  if (r == -1 || nbd_is_read_only (h->nbd) == 1) {
    static __thread char text[256];
    const char *error = nbd_get_error ();
    snprintf (text, sizeof text, "cannot connect: %s",
              r == -1 ? (error ? error : "no answer within the timeout")
                      : "the export is read-only");
    *why = text;
    nbd_close (h->nbd);
    free (h);
    return NULL;
  }
  return h;
}

static void
give_back (struct slot *sl, struct handle *h)
{
  pthread_mutex_lock (&sl->lock);
  if (h->gen == sl->gen) {
    h->next = sl->idle;
    sl->idle = h;
    h = NULL;
  }
  pthread_mutex_unlock (&sl->lock);
  if (h) {
    nbd_close (h->nbd);
    free (h);
  }
}

static int
write_local (int fd, const char *buf, uint32_t count, uint64_t offset, bool fua)
{
  while (count > 0) {
    ssize_t n = pwrite (fd, buf, count, offset);
    if (n == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    buf += n;
    count -= n;
    offset += n;
  }
  return fua ? fdatasync (fd) : 0;
}

/* The secondary's part of a write; 0, or -1 with errno and *why. */
static int
write_remote (struct slot *sl, const void *buf, uint32_t count, uint64_t offset,
              bool fua, const char **why)
{
  int64_t deadline = now_ns () + sl->timeout_ns;
  struct handle *h = take (sl, deadline, why);
  if (!h) {
    errno = ECONNREFUSED;           /* the plugin asks the secondary why (a fence?) */
    return -1;
  }
  uint32_t flags = fua && nbd_can_fua (h->nbd) == 1 ? LIBNBD_CMD_FLAG_FUA : 0;
  int64_t cookie = nbd_aio_pwrite (h->nbd, buf, count, offset, NBD_NULL_COMPLETION, flags);
  if (cookie == -1 || await (h->nbd, cookie, deadline) == -1) {
    int err = cookie == -1 ? (nbd_get_errno () ? nbd_get_errno () : EIO) : errno;
    *why = strerror (err);
    nbd_close (h->nbd);
    free (h);
    errno = err;
    return -1;
  }
  give_back (sl, h);
  return 0;
}

/* An armed slot's pwrite; -1 with *err, 0 done, 1 hand it to the plugin. */
static int
fast_pwrite (struct slot *sl, int fd, const void *buf, uint32_t count, uint64_t offset,
             bool fua, int *err)
{
  if (!guard_ok ())
    return 1;
  if (write_local (fd, buf, count, offset, fua) == -1) {
    *err = errno;
    nbdkit_error ("repdisk-fast: local write at %" PRIu64 ": %m", offset);
    return -1;
  }
  const char *why = NULL;
  if (write_remote (sl, buf, count, offset, fua, &why) == -1) {
    sl->failed ((int) (sl - slots), offset, count, errno, why ? why : "unknown error");
    return 1;
  }
  return guard_ok () ? 0 : 1;
}

/* Whether a write of count bytes may be marked in C: the log has room and the unsent
 * bytes stay within the plugin's max-lag. */
static bool
may_mark (struct slot *sl, uint32_t count)
{
  pthread_mutex_lock (&sl->marks_lock);
  bool ok = sl->nmarks < MAX_MARKS && sl->unsent + count <= sl->max_lag;
  pthread_mutex_unlock (&sl->marks_lock);
  return ok;
}

/* Put [offset, offset+count) in the mark log and wake the forwarder if it was not woken
 * since it last looked; false if the log is full. */
static bool
mark (struct slot *sl, uint64_t offset, uint32_t count)
{
  pthread_mutex_lock (&sl->marks_lock);
  bool room = sl->nmarks < MAX_MARKS;
  if (room) {
    sl->marks[sl->nmarks][0] = offset;
    sl->marks[sl->nmarks][1] = count;
    sl->nmarks++;
    sl->marked += count;
    sl->unsent += count;
  }
  pthread_mutex_unlock (&sl->marks_lock);
  if (room && !__atomic_exchange_n (&sl->signalled, 1, __ATOMIC_SEQ_CST))
    eventfd_write (sl->wake_fd, 1);
  return room;
}

/* An armed write-back slot's pwrite; -1 with *err, 0 done, 1 hand it to the plugin (it
 * writes and marks again: the same bytes, so harmless). */
static int
write_back (struct slot *sl, int fd, const void *buf, uint32_t count, uint64_t offset,
            bool fua, int *err)
{
  if (!guard_ok () || !may_mark (sl, count))
    return 1;
  if (write_local (fd, buf, count, offset, fua) == -1) {
    *err = errno;
    nbdkit_error ("repdisk-fast: local write at %" PRIu64 ": %m", offset);
    return -1;
  }
  return mark (sl, offset, count) ? 0 : 1;
}

/* Whether every cluster of [offset, offset+count) is in the replica slot's hidden
 * overlay: its old contents copied since the last checkpoint (bits are set by the plugin
 * after the copy, and cleared only while the slot is disarmed). */
static bool
copied (const struct slot *sl, uint64_t offset, uint32_t count)
{
  uint64_t end = ((offset + count - 1) >> sl->shift) + 1;
  for (uint64_t c = offset >> sl->shift; c < end; c++)
    if (!(__atomic_load_n (&sl->bits[c >> 3], __ATOMIC_ACQUIRE) >> (c & 7) & 1))
      return false;
  return true;
}

/* An armed replica slot's pwrite, of its writer session; 0 done, 1 hand it to the plugin:
 * a cluster still to copy (copy-before-write is the plugin's), or a failed local write
 * (the plugin writes again and reports it its way). */
static int
replica_write (struct slot *sl, int fd, const void *buf, uint32_t count, uint64_t offset,
               bool fua)
{
  if (count == 0 || !copied (sl, offset, count))
    return 1;
  return write_local (fd, buf, count, offset, fua) == -1 ? 1 : 0;
}

static void *
fast_open (nbdkit_next_open *next, nbdkit_context *nxdata, int readonly,
           const char *exportname, int is_tls __attribute__ ((unused)))
{
  bound_cell = -1;
  bound_session = -1;
  if (next (nxdata, readonly, exportname) == -1)
    return NULL;
  struct conn *c = malloc (sizeof *c);
  if (!c) {
    nbdkit_error ("malloc: %m");
    return NULL;
  }
  c->cell = bound_cell;             /* the plugin's open bound it (repdisk_fast_bind) */
  c->session = bound_session;
  bound_cell = -1;
  bound_session = -1;
  return c;
}

static void
fast_close (void *handle)
{
  free (handle);
}

static void
count_write (struct slot *sl, uint32_t count)
{
  __atomic_add_fetch (&sl->writes, 1, __ATOMIC_RELAXED);
  __atomic_add_fetch (&sl->bytes, count, __ATOMIC_RELAXED);
}

/* A direct write of a replica slot goes to the plugin after all. */
static void
undirect (struct slot *sl)
{
  pthread_mutex_lock (&sl->lock);
  end_direct (sl);
  pthread_mutex_unlock (&sl->lock);
}

static int
fast_write (nbdkit_next *next, void *handle, const void *buf, uint32_t count,
            uint64_t offset, uint32_t flags, int *err)
{
  struct slot *sl = slot_of (handle);
  if (!sl)
    return next->pwrite (next, buf, count, offset, flags, err);
  int fd, r = 1;
  bool fua = flags & NBDKIT_FLAG_FUA, armed = enter (sl, handle, &fd);
  bool ranged = armed && sl->kind == SYNC, direct = armed && sl->kind == REPLICA;
  struct range me;
  if (ranged)
    range_lock (sl, &me, offset, offset + count);
  if (armed)
    r = sl->kind == SYNC ? fast_pwrite (sl, fd, buf, count, offset, fua, err)
      : sl->kind == WRITE_BACK ? write_back (sl, fd, buf, count, offset, fua, err)
      : replica_write (sl, fd, buf, count, offset, fua);
  if (r == 1) {
    if (direct)
      undirect (sl);
    direct = false;
    r = next->pwrite (next, buf, count, offset, flags, err);
  }
  else if (r == 0)
    count_write (sl, count);
  if (ranged)
    range_unlock (sl, &me);
  leave (sl, direct);
  return r;
}

/* zero and trim: the plugin's, under the range lock while a sync slot is armed. */
#define HANDED(call)                                                    \
  struct slot *sl = slot_of (handle);                                   \
  if (!sl)                                                              \
    return call;                                                        \
  int fd_;                                                              \
  bool armed = enter (sl, handle, &fd_);                                \
  if (armed && sl->kind == REPLICA)                                     \
    undirect (sl);                                                      \
  bool ranged = armed && sl->kind == SYNC;                              \
  struct range me;                                                      \
  if (ranged)                                                           \
    range_lock (sl, &me, offset, offset + count);                       \
  int r = call;                                                         \
  if (ranged)                                                           \
    range_unlock (sl, &me);                                             \
  leave (sl, false);                                                    \
  return r

static int
fast_zero (nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
           uint32_t flags, int *err)
{
  HANDED (next->zero (next, count, offset, flags, err));
}

static int
fast_trim (nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
           uint32_t flags, int *err)
{
  HANDED (next->trim (next, count, offset, flags, err));
}

static struct nbdkit_filter filter = {
  .name = "repdisk-fast",
  .longname = "repdisk's fast path",
  .open = fast_open,
  .close = fast_close,
  .pwrite = fast_write,
  .zero = fast_zero,
  .trim = fast_trim,
};

NBDKIT_REGISTER_FILTER (filter)
