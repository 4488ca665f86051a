/* Waiting for the peer (fable._core): the doorbells (a futex word and a waiters flag per
 * direction, ring.h), and the waits of one slice without the GIL, in three modes (spin, futex,
 * adaptive). Two callers: Ring.wait (one slice; the Python slow path loops) and hot_wait (the
 * hot path's whole wait, slice after slice, within one call). */
#include "core.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Shared futexes (no FUTEX_PRIVATE_FLAG): the two sides are different processes. */
/* Returns 0 or the errno (EAGAIN: the word changed; ETIMEDOUT; EINTR: a signal arrived). */
static int futex_wait(uint32_t *word, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts = {(time_t)(timeout_ns / 1000000000ULL), (long)(timeout_ns % 1000000000ULL)};
    return syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, NULL, 0) < 0 ? errno : 0;
}

static void futex_wake(uint32_t *word) { syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0); }

/* After moving our position to `pos`: ring the peer's doorbell if its waiters flag says it
 * sleeps (and, for a writer asleep for space, `wanted` says `pos` is enough; NULL: any move). */
FR_HIDDEN void ring_bell(uint32_t *waiting, uint32_t *bell, int evfd, const uint64_t *wanted, uint64_t pos) {
    /* SYNC POINT: StoreLoad fence between our position store and the flag load; pairs with the
     * sleeper's seq_cst fetch_or of the flag before it re-checks our position (wait_ready). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    /* SYNC POINT: acquire load of the flag, ordered by the fence above; acquire so that the
     * wanted HEAD a writer stores before it sets the flag is seen with the flag. */
    uint32_t f = __atomic_load_n(waiting, __ATOMIC_ACQUIRE);
    if (!f) return; /* fast path: no system call */
    /* SYNC POINT: relaxed load of the sleeper's wanted position, ordered by the acquire above
     * (pairs with wait_ready's store before its seq_cst fetch_or of the flag). */
    if (wanted && f == FR_WAIT_FUTEX && pos < __atomic_load_n(wanted, __ATOMIC_RELAXED)) return;
    /* SYNC POINT: seq_cst exchange: exactly one ringer takes the sleeper's bits (and wakes it);
     * pairs with the sleeper's fetch_or in wait_ready / Ring_arm. */
    uint32_t w = __atomic_exchange_n(waiting, 0, __ATOMIC_SEQ_CST);
    if (!w) return;
    /* SYNC POINT: release increment of the doorbell; pairs with the sleeper's acquire load of
     * the bell value it passes to FUTEX_WAIT (a changed value makes the wait return at once). */
    __atomic_fetch_add(bell, 1, __ATOMIC_RELEASE);
    if (w & FR_WAIT_FUTEX) futex_wake(bell);
    if ((w & FR_WAIT_EVENT) && evfd >= 0) {
        /* The peer's readiness socket: MSG_DONTWAIT is a flag of this call, which no peer can
         * clear (O_NONBLOCK belongs to the open file description the peer shares, so a write()
         * here could be made to block forever with the GIL held). A full socket is readable
         * already; a broken one is the peer's loss: either way nothing more to do. */
        char one = 1;
        ssize_t r = send(evfd, &one, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
        (void)r;
    }
}


/* The condition a side waits for: the reader for TAIL beyond its position, the writer for
 * `need` free bytes. Both read the peer's position without validating it: the caller re-checks
 * through peek()/reserve(), which validate. */
static int ready(Ring *r, uint64_t need) {
    if (r->writer) {
        /* SYNC POINT: acquire-load of HEAD; pairs with the reader's release in advance_head. */
        uint64_t head = __atomic_load_n(&r->h->head, __ATOMIC_ACQUIRE);
        return head <= r->claim && r->cap - (r->claim - head) >= need;
    }
    /* SYNC POINT: acquire-load of TAIL; pairs with the writer's release in do_publish. */
    return __atomic_load_n(&r->h->tail, __ATOMIC_ACQUIRE) > r->pos;
}


#define SPIN_FIRST 255 /* looks before any mode sleeps: a reply a few microseconds away */
#define SPIN_EAGER 1024
#define SPIN_MAX_PAUSES 32

/* One wait, without the GIL (the caller released it and holds r->busy): until the ring is
 * ready, `end` (monotonic ns) passes, r->stop is set, or (futex) a signal arrives (*intr = 1).
 * Returns ready. Spin mode spins to `end`; adaptive spins for `spin_ns` (not when the peer last
 * ran on this CPU), yields, then sleeps; futex sleeps at once. */
static int wait_ready(Ring *r, uint64_t need, fr_wait_mode mode, uint64_t end, uint64_t spin_ns, int *intr) {
    fr_header *h = r->h;
    uint32_t *flag = r->writer ? &h->space_waiting : &h->data_waiting;
    uint32_t *bell = r->writer ? &h->space_bell : &h->data_bell;
    uint32_t *mine = r->writer ? &h->writer_cpu : &h->reader_cpu;
    uint32_t *theirs = r->writer ? &h->reader_cpu : &h->writer_cpu;
    int ok = 0;
    uint64_t start = now_ns();
    int cpu = sched_getcpu();
    /* SYNC POINT: none; a relaxed store of a hint (this side's CPU, 0 = unknown) that the
     * peer's relaxed load below reads when it chooses whether to spin: stale is harmless. */
    __atomic_store_n(mine, (uint32_t)(cpu + 1), __ATOMIC_RELAXED);
    uint64_t spin_until = mode == FR_MODE_SPIN ? end : mode == FR_MODE_ADAPTIVE ? start + spin_ns : start;
    /* SYNC POINT: none; the relaxed load of the peer's hint (see above). */
    if (mode == FR_MODE_ADAPTIVE && __atomic_load_n(theirs, __ATOMIC_RELAXED) == (uint32_t)(cpu + 1))
        spin_until = start; /* the peer last ran on this CPU: spinning would only delay it */
    /* Each look at the peer's position pulls its cache line away from the peer, which then
     * pays for its next store there: after SPIN_EAGER looks, look half as often each time (up
     * to one look per SPIN_MAX_PAUSES pauses). A ping-pong's waits end well before that. */
    unsigned pauses = 1;
    for (unsigned i = 0;; i++) {
        if ((ok = ready(r, need))) return 1;
        /* SYNC POINT: none; a relaxed load of our own flag, set by interrupt() or close() on
         * another thread of this process (the bell it rings ends a futex wait below). */
        if (__atomic_load_n(&r->stop, __ATOMIC_RELAXED)) return 0;
        if (i >= SPIN_FIRST && (i & 15) == 15 && now_ns() >= spin_until) break;
        for (unsigned k = 0; k < pauses; k++) cpu_relax();
        if (i >= SPIN_EAGER && pauses < SPIN_MAX_PAUSES) pauses <<= 1;
    }
    if (mode == FR_MODE_ADAPTIVE) {
        for (int k = 0; k < 4; k++) {
            if (ready(r, need)) return 1;
            sched_yield();
        }
    }
    /* SYNC POINT: none; the relaxed load of our own stop flag again (see the spin loop). */
    while (!ok && mode != FR_MODE_SPIN && !__atomic_load_n(&r->stop, __ATOMIC_RELAXED)) {
        uint64_t t = now_ns();
        if (t >= end) break;
        /* SYNC POINT: acquire-load of the bell before the flag is set; pairs with the release
         * fetch_add in ring_bell, so a ring between here and FUTEX_WAIT makes the wait return. */
        uint32_t b = __atomic_load_n(bell, __ATOMIC_ACQUIRE);
        if (r->writer) {
            uint64_t want = r->claim + need > r->cap ? r->claim + need - r->cap : 0;
            /* SYNC POINT: relaxed store of the HEAD this writer sleeps for, published by the
             * seq_cst fetch_or just below (the reader's acquire load of the flag). */
            __atomic_store_n(&h->space_wanted, want, __ATOMIC_RELAXED);
        }
        /* SYNC POINT: seq_cst fetch_or of the waiters flag, then re-check; pairs with the
         * fence in the peer's ring_bell. */
        __atomic_fetch_or(flag, FR_WAIT_FUTEX, __ATOMIC_SEQ_CST);
        /* SYNC POINT: none; clearing our own bit (relaxed): a ring that finds it set after we
         * stopped waiting costs one spare wake-up, never a lost one. (Also below.) */
        if ((ok = ready(r, need))) { __atomic_fetch_and(flag, ~FR_WAIT_FUTEX, __ATOMIC_RELAXED); break; }
        int err = futex_wait(bell, b, end - t);
        __atomic_fetch_and(flag, ~FR_WAIT_FUTEX, __ATOMIC_RELAXED);
        ok = ready(r, need);
        if (err == EINTR) { *intr = 1; break; } /* the caller runs the signal handlers now */
    }
    return ok;
}

/* wait(need, mode, slice_ns, spin_ns) -> bool (ready). mode: an fr_wait_mode.
 * Waits at most one slice, without the GIL; the caller loops, checking liveness and signals. */
FR_HIDDEN PyObject *Ring_wait(Ring *self, PyObject *args) {
    unsigned long long need, slice_ns, spin_ns; int m;
    if (check_open(self) < 0 || !PyArg_ParseTuple(args, "KiKK", &need, &m, &slice_ns, &spin_ns)) return NULL;
    if (m < FR_MODE_SPIN || m > FR_MODE_ADAPTIVE) { PyErr_SetString(PyExc_ValueError, "mode must be 0 (spin), 1 (futex) or 2 (adaptive)"); return NULL; }
    int ok, intr = 0;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    ok = wait_ready(self, need, (fr_wait_mode)m, now_ns() + slice_ns, spin_ns, &intr);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (self->closing) ring_release_view(self);
    return PyBool_FromLong(ok);
}

/* Whether the liveness fd has news (readable, hung up, or in error): checked once a slice. */
static int live_news(int fd) {
    struct pollfd p = {.fd = fd, .events = POLLIN | POLLRDHUP};
    return poll(&p, 1, 0) != 0; /* an error (EINTR) counts as news: the slow path looks */
}

/* The hot path's wait (hot.c): until the ring is ready (1), slice after slice of r->slice_ns
 * with the GIL released between the checks of each slice's end: the signal handlers (an
 * exception: -1), and news on the liveness fd, r->stop (interrupt, close), the gate, or the
 * deadline `until` (0: none), each of which sends the call to its slow path (0). The peer's
 * close or death is so noticed within one slice, as by the slow path's own wait. */
FR_HIDDEN int hot_wait(Ring *r, uint64_t need, uint64_t until) {
    if (r->cpu_hint) {
        /* SYNC POINT: none; the relaxed CPU hint (wait_ready), on the ring the peer waits on. */
        __atomic_store_n(r->cpu_hint, (uint32_t)(sched_getcpu() + 1), __ATOMIC_RELAXED);
    }
    for (;;) {
        /* SYNC POINT: none; our own stop flag (relaxed: see wait_ready), with the GIL held. */
        if (__atomic_load_n(&r->stop, __ATOMIC_RELAXED) || r->closing || r->gate || !r->has_view) return 0;
        uint64_t t = now_ns();
        if (until && t >= until) return 0;
        uint64_t end = t + r->slice_ns;
        if (until && until < end) end = until;
        int ok, intr = 0;
        r->busy++;
        Py_BEGIN_ALLOW_THREADS
        ok = wait_ready(r, need, (fr_wait_mode)r->wmode, end, r->spin_ns, &intr);
        Py_END_ALLOW_THREADS
        r->busy--;
        if (r->closing) {
            ring_release_view(r);
            return 0;
        }
        if (ok) return 1;
        if (PyErr_CheckSignals() < 0) return -1;
        if (r->live_fd >= 0 && live_news(r->live_fd)) return 0;
    }
}

/* Wake this side's own wait in progress (interrupt, close): its bell changes (a FUTEX_WAIT
 * about to start returns at once) and is woken. The peer only ever sees one spare ring of a
 * bell that wakes nobody but us. */
FR_HIDDEN void wake_own(Ring *r) {
    uint32_t *bell = r->writer ? &r->h->space_bell : &r->h->data_bell;
    /* SYNC POINT: release increment of the bell we wait on; pairs with the acquire load of the
     * bell in wait_ready, like a ring from the peer. */
    __atomic_fetch_add(bell, 1, __ATOMIC_RELEASE);
    futex_wake(bell);
}

/* interrupt(on): while on, a wait of this side returns at once (False unless ready): another
 * thread of this process is closing the connection, or failed it. Turning it on wakes a wait in
 * progress (wake_own). */
FR_HIDDEN PyObject *Ring_interrupt(Ring *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    /* SYNC POINT: a release store of our flag; the waiting thread's relaxed loads see it at
     * the latest after the futex wake in wake_own (a system call each side). */
    __atomic_store_n(&self->stop, on, __ATOMIC_RELEASE);
    if (on && self->has_view && !self->closing) wake_own(self);
    Py_RETURN_NONE;
}

/* Set the event bit so the writer signals our doorbell on its next publish; 1 when data is
 * already there (then the bit is cleared again and the caller reads instead). */
FR_HIDDEN int arm_event(Ring *r) {
    /* SYNC POINT: seq_cst fetch_or, then re-check TAIL; pairs with the fence in ring_bell. */
    __atomic_fetch_or(&r->h->data_waiting, FR_WAIT_EVENT, __ATOMIC_SEQ_CST);
    if (ready(r, 0)) {
        disarm_event(r);
        return 1;
    }
    return 0;
}

/* Clear our event bit (the C writer already cleared it when it rang; a Python writer never
 * does, so the reader does). */
FR_HIDDEN void disarm_event(Ring *r) {
    /* SYNC POINT: none; clearing our own bit (relaxed): at worst one spare doorbell ring. */
    __atomic_fetch_and(&r->h->data_waiting, ~FR_WAIT_EVENT, __ATOMIC_RELAXED);
}

/* arm() -> bool: arm_event; True when data is already there (nothing is armed then). */
FR_HIDDEN PyObject *Ring_arm(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (reader_only(self) < 0) return NULL;
    return PyBool_FromLong(arm_event(self));
}

/* note_cpu(): publish the CPU this thread runs on in this side's field of the ring. A side
 * waits on one ring but the peer looks for it on the other, so it notes itself on both. */
FR_HIDDEN PyObject *Ring_note_cpu(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self) < 0) return NULL;
    int cpu = sched_getcpu();
    /* SYNC POINT: none; the relaxed store of the CPU hint that Ring_wait's peer reads. */
    __atomic_store_n(self->writer ? &self->h->writer_cpu : &self->h->reader_cpu, (uint32_t)(cpu + 1), __ATOMIC_RELAXED);
    return PyLong_FromLong(cpu);
}

/* disarm(): the reader consumed its wake-up (disarm_event). */
FR_HIDDEN PyObject *Ring_disarm(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (reader_only(self) < 0) return NULL;
    disarm_event(self);
    Py_RETURN_NONE;
}
