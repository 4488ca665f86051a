/* fable._core: the per-message fast path of the shared-memory ring (layout: ring.h).
 *
 * One Ring object is one side of one ring: a writer (claim + copy + publish, batched publish,
 * doorbell) or a reader (peek + sequence check, copy out, release in any order, doorbell). The
 * protocol is the one of src/fable/ring/pyring.py, the executable reference; tests check that
 * both behave alike. Policy (timeouts, liveness, which wait to use) stays in Python: the waits
 * here cover one slice, release the GIL, and return.
 *
 * Every value read from the peer's memory is read once and range-checked; a violation raises
 * fable.ProtocolError and nothing outside the mapping is ever touched.
 *
 * Also here: vmsplice(), which Python's os module lacks (the vmsplice-coop transport). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "ring.h"

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

static PyObject *ProtocolError; /* fable.errors.ProtocolError, imported at module init */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Shared futexes (no FUTEX_PRIVATE_FLAG): the two sides are different processes. */
/* Returns 0 or the errno (EAGAIN: the word changed; ETIMEDOUT; EINTR: a signal arrived). */
static int futex_wait(uint32_t *word, uint32_t expected, uint64_t timeout_ns) {
    struct timespec ts = {(time_t)(timeout_ns / 1000000000ULL), (long)(timeout_ns % 1000000000ULL)};
    return syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, NULL, 0) < 0 ? errno : 0;
}

static void futex_wake(uint32_t *word) { syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0); }

/* After moving our position: ring the peer's doorbell if its waiters flag says it sleeps. */
static void ring_bell(uint32_t *waiting, uint32_t *bell, int evfd) {
    /* SYNC POINT: StoreLoad fence between our position store and the flag load; pairs with the
     * sleeper's seq_cst fetch_or of the flag before it re-checks our position (arm_wait). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    /* SYNC POINT: relaxed load of the flag, ordered by the fence above. */
    if (!__atomic_load_n(waiting, __ATOMIC_RELAXED)) return; /* fast path: no system call */
    /* SYNC POINT: seq_cst exchange: exactly one ringer takes the sleeper's bits (and wakes it);
     * pairs with the sleeper's fetch_or in Ring_wait / Ring_arm. */
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

/* A record the writer reserved, until do_publish writes its header and moves TAIL over it. */
typedef enum {
    SLOT_RESERVED = 0,  /* handed out by reserve(), not yet committed: holds back later ones */
    SLOT_COMMITTED = 1, /* committed: published with its length and flags */
    SLOT_PADDING = 2,   /* aborted, or the gap at the end of the data area: published as F_PAD */
} slot_state;

typedef struct { uint64_t pos, room; int64_t length; uint32_t flags; slot_state state; } slot_t;
typedef struct { uint64_t pos, span; int released; } held_t;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    int busy;           /* waits in progress without the GIL: do not release the memory */
    int stop;           /* interrupt(True): waits return at once (a close from another thread) */
    int closing;
    int writer;         /* 1 writer, 0 reader */
    fr_header *h;
    uint8_t *data;
    uint64_t cap, mask;
    uint32_t epoch;
    uint64_t seq;
    int evfd;           /* eventfd to signal: the reader's readiness fd */
    /* writer */
    uint64_t tail, claim, head_cache, max_record;
    slot_t *slots; size_t nslots, slot0, slots_cap;
    /* reader */
    uint64_t head, pos, tail_cache;
    held_t *held; size_t nheld, held0, held_cap;
    /* the Connection's hot path (send on the writer, recv on the reader): */
    PyObject *slow;     /* Python callable for everything but the fast case */
    int gate;           /* set by Python while its own state needs the slow path */
    uint64_t frag;      /* largest message send() writes as one record */
    uint64_t msgs, bytes;
} Ring;

static PyObject *ConnectionClosed;

static PyObject *proto_error(const char *fmt, ...) {
    va_list va;
    va_start(va, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, va);
    va_end(va);
    if (msg) { PyErr_SetObject(ProtocolError, msg); Py_DECREF(msg); }
    return NULL;
}

static int check_open(Ring *r) {
    if (!r->has_view || r->closing) { PyErr_SetString(PyExc_ValueError, "ring is closed"); return -1; }
    return 0;
}

/* ------------------------------------------------------------------------------ lifecycle */
static int Ring_init(Ring *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"mem", "writer", "epoch", "first_seq", "eventfd", NULL};
    PyObject *mem; int writer; unsigned int epoch = 0; unsigned long long first_seq = 0; int evfd = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Op|IKi", kwlist, &mem, &writer, &epoch, &first_seq, &evfd))
        return -1;
    if (self->has_view) { PyErr_SetString(PyExc_RuntimeError, "Ring already initialised"); return -1; }
    if (PyObject_GetBuffer(mem, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    self->has_view = 1;
    if ((uintptr_t)self->view.buf % FR_CACHE_LINE || self->view.len < (Py_ssize_t)(FR_HEADER_SIZE + FR_MIN_CAPACITY)) {
        proto_error("shared memory too small or misaligned for a ring");
        return -1;
    }
    fr_header *h = (fr_header *)self->view.buf;
    /* SYNC POINT: acquire-loads of the header the creator formatted (format_ring) before it
     * passed the memfd; the fd's passing (SCM_RIGHTS, a system call each side) already orders
     * them, the acquire keeps that explicit. Read once, then checked. */
    uint64_t cap = __atomic_load_n(&h->capacity, __ATOMIC_ACQUIRE);
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != FR_MAGIC) { proto_error("not a fable ring (bad magic)"); return -1; }
    if (h->version != FR_VERSION || h->header_size != FR_HEADER_SIZE) {
        proto_error("ring format version %u, expected %u", (unsigned)h->version, FR_VERSION);
        return -1;
    }
    if (cap < FR_MIN_CAPACITY || cap > FR_MAX_CAPACITY || (cap & (cap - 1)) ||
        FR_HEADER_SIZE + cap > (uint64_t)self->view.len) {
        proto_error("ring capacity %llu does not fit the shared memory", (unsigned long long)cap);
        return -1;
    }
    self->h = h;
    self->data = (uint8_t *)self->view.buf + FR_HEADER_SIZE;
    self->cap = cap;
    self->mask = cap - 1;
    self->writer = writer;
    self->epoch = epoch;
    self->seq = first_seq;
    self->evfd = evfd;
    if (writer) {
        /* SYNC POINT: acquire-loads of the starting positions; pair with the release-stores
         * of the previous owner of this side, if any (do_publish, advance_head). */
        self->tail = self->claim = __atomic_load_n(&h->tail, __ATOMIC_ACQUIRE);
        self->head_cache = __atomic_load_n(&h->head, __ATOMIC_ACQUIRE);
        /* the peer may have written both (it created the ring): the reader's HEAD can be
         * neither past what was published nor a whole ring behind it */
        if (self->head_cache > self->tail || self->tail - self->head_cache > cap) {
            proto_error("ring positions out of range at setup (HEAD %llu, TAIL %llu)",
                        (unsigned long long)self->head_cache, (unsigned long long)self->tail);
            return -1;
        }
        self->max_record = cap / 4 - FR_RECORD_HEADER;
    } else {
        /* SYNC POINT: acquire-load of the starting HEAD; pairs with advance_head's release. */
        self->head = self->pos = self->tail_cache = __atomic_load_n(&h->head, __ATOMIC_ACQUIRE);
    }
    return 0;
}

static void ring_release_view(Ring *self) {
    if (self->has_view && !self->busy) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
}

static PyObject *Ring_close(Ring *self, PyObject *Py_UNUSED(ignored)) {
    self->closing = 1;
    ring_release_view(self); /* deferred to the end of a wait in progress */
    Py_RETURN_NONE;
}

static void Ring_dealloc(Ring *self) {
    Py_CLEAR(self->slow);
    self->busy = 0;
    ring_release_view(self);
    PyMem_Free(self->slots);
    PyMem_Free(self->held);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ------------------------------------------------------------------------------ writer */
static int writer_only(Ring *r) {
    if (check_open(r) < 0) return -1;
    if (!r->writer) { PyErr_SetString(PyExc_TypeError, "this Ring is the reading side"); return -1; }
    return 0;
}

static int reader_only(Ring *r) {
    if (check_open(r) < 0) return -1;
    if (r->writer) { PyErr_SetString(PyExc_TypeError, "this Ring is the writing side"); return -1; }
    return 0;
}

/* The reader's HEAD, read once and checked: it may only move forward, never past our TAIL. */
static int load_head(Ring *r, uint64_t *out) {
    /* SYNC POINT: acquire-load of HEAD; pairs with the reader's release-store in release_at. */
    uint64_t head = __atomic_load_n(&r->h->head, __ATOMIC_ACQUIRE);
    if (head < r->head_cache || head > r->tail) {
        proto_error("the reader moved HEAD to %llu (published %llu)", (unsigned long long)head,
                    (unsigned long long)r->tail);
        return -1;
    }
    r->head_cache = head;
    *out = head;
    return 0;
}

static int fits(Ring *r, uint64_t need) {
    if (r->cap - (r->claim - r->head_cache) >= need) return 1;
    uint64_t head;
    if (load_head(r, &head) < 0) return -1;
    return r->cap - (r->claim - head) >= need;
}

/* Room for one more element at the end of a deque kept as (array, first, count, capacity):
 * compacts to the front when the front has space, else grows. Returns the new element. */
static void *deque_push(void **arr, size_t *first, size_t n, size_t *cap, size_t elem) {
    if (*first + n == *cap) {
        if (*first) {
            memmove(*arr, (char *)*arr + *first * elem, n * elem);
            *first = 0;
        } else {
            size_t ncap = *cap ? 2 * *cap : 16;
            void *grown = PyMem_Realloc(*arr, ncap * elem);
            if (!grown) { PyErr_NoMemory(); return NULL; }
            *arr = grown;
            *cap = ncap;
        }
    }
    return (char *)*arr + (*first + n) * elem;
}

static int push_slot(Ring *r, uint64_t pos, uint64_t room, slot_state state, int64_t length) {
    void *arr = r->slots;
    slot_t *s = deque_push(&arr, &r->slot0, r->nslots, &r->slots_cap, sizeof(slot_t));
    r->slots = arr;
    if (!s) return -1;
    r->nslots++;
    s->pos = pos; s->room = room; s->state = state; s->length = length; s->flags = 0;
    return 0;
}

/* reserve: 1 = reserved (*pos, *offset set), 0 = no room, -1 = error */
static int do_reserve(Ring *r, uint64_t length, uint64_t *pos, uint64_t *offset) {
    if (length > r->max_record) {
        PyErr_Format(PyExc_ValueError, "record length must be in 0..%llu", (unsigned long long)r->max_record);
        return -1;
    }
    uint64_t span = fr_span(length, 0);
    uint64_t off = r->claim & r->mask, to_end = r->cap - off;
    uint64_t pad = to_end < span ? to_end : 0;
    int ok = fits(r, pad + span);
    if (ok <= 0) return ok;
    if (pad) {
        if (push_slot(r, r->claim, 0, SLOT_PADDING, (int64_t)to_end) < 0) return -1;
        r->claim += pad;
    }
    if (push_slot(r, r->claim, length, SLOT_RESERVED, -1) < 0) return -1;
    *pos = r->claim;
    *offset = FR_HEADER_SIZE + (r->claim & r->mask) + FR_RECORD_HEADER;
    r->claim += span;
    return 1;
}

static slot_t *find_slot(Ring *r, uint64_t pos) {
    for (size_t k = 0; k < r->nslots; k++) {
        slot_t *s = &r->slots[r->slot0 + k];
        if (s->pos == pos) {
            if (s->state != SLOT_RESERVED) { PyErr_SetString(PyExc_ValueError, "record already committed or aborted"); return NULL; }
            return s;
        }
    }
    PyErr_Format(PyExc_ValueError, "no reserved record at position %llu", (unsigned long long)pos);
    return NULL;
}

/* Write the headers of the committed prefix and release-store TAIL; returns records published. */
static long do_publish(Ring *r) {
    long n = 0;
    uint64_t tail = r->tail;
    size_t k = 0;
    while (k < r->nslots && r->slots[r->slot0 + k].state != SLOT_RESERVED) {
        slot_t *s = &r->slots[r->slot0 + k];
        fr_record *rec = (fr_record *)(r->data + (s->pos & r->mask));
        if (s->state == SLOT_PADDING) {
            uint64_t gap = (uint64_t)s->length;
            if (gap >= FR_RECORD_HEADER) {
                rec->length = (uint32_t)(gap - FR_RECORD_HEADER);
                rec->flags = FR_F_PAD; rec->zero = 0; rec->seq = 0; rec->epoch = r->epoch; rec->skip = 0;
            }
            tail = s->pos + gap;
        } else {
            rec->length = (uint32_t)s->length;
            rec->flags = (uint16_t)s->flags; rec->zero = 0;
            rec->seq = r->seq++;
            rec->epoch = r->epoch;
            rec->skip = (uint32_t)(fr_align8(s->room) - fr_align8((uint64_t)s->length));
            tail = s->pos + fr_span(s->room, 0);
            n++;
        }
        k++;
    }
    if (k) {
        r->slot0 += k;
        r->nslots -= k;
        if (!r->nslots) r->slot0 = 0;
        r->tail = tail;
        /* SYNC POINT: release-store of TAIL after the records; pairs with the reader's
         * acquire-load of TAIL in load_tail. */
        __atomic_store_n(&r->h->tail, tail, __ATOMIC_RELEASE);
        ring_bell(&r->h->data_waiting, &r->h->data_bell, r->evfd);
    }
    return n;
}

/* Reserve, copy and commit one record (published by the caller): 1 done, 0 no room, -1 error. */
static int append_record(Ring *r, const void *data, uint64_t len, uint32_t flags) {
    uint64_t pos, offset;
    int ok = do_reserve(r, len, &pos, &offset);
    if (ok <= 0) return ok;
    memcpy((uint8_t *)r->view.buf + offset, data, (size_t)len);
    slot_t *s = &r->slots[r->slot0 + r->nslots - 1];
    s->length = (int64_t)len; s->flags = flags; s->state = SLOT_COMMITTED;
    return 1;
}

static PyObject *Ring_reserve(Ring *self, PyObject *arg) {
    if (writer_only(self) < 0) return NULL;
    long long length = PyLong_AsLongLong(arg);
    if (length == -1 && PyErr_Occurred()) return NULL;
    if (length < 0) { PyErr_SetString(PyExc_ValueError, "record length must be >= 0"); return NULL; }
    uint64_t pos, offset;
    int ok = do_reserve(self, (uint64_t)length, &pos, &offset);
    if (ok < 0) return NULL;
    if (!ok) Py_RETURN_NONE;
    return Py_BuildValue("KKL", (unsigned long long)pos, (unsigned long long)offset, length);
}

static PyObject *Ring_commit(Ring *self, PyObject *args) {
    unsigned long long pos; long long length; unsigned int flags = 0;
    if (writer_only(self) < 0 || !PyArg_ParseTuple(args, "KL|I", &pos, &length, &flags)) return NULL;
    slot_t *s = find_slot(self, pos);
    if (!s) return NULL;
    if (length < 0 || (uint64_t)length > s->room) {
        PyErr_Format(PyExc_ValueError, "length must be in 0..%llu", (unsigned long long)s->room);
        return NULL;
    }
    if (flags & ~(FR_F_MORE | FR_F_CLOSE)) { PyErr_SetString(PyExc_ValueError, "commit takes F_MORE and F_CLOSE only"); return NULL; }
    s->length = length; s->flags = flags; s->state = SLOT_COMMITTED;
    Py_RETURN_NONE;
}

static PyObject *Ring_abort(Ring *self, PyObject *arg) {
    if (writer_only(self) < 0) return NULL;
    unsigned long long pos = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    slot_t *s = find_slot(self, pos);
    if (!s) return NULL;
    s->state = SLOT_PADDING;
    s->length = (int64_t)fr_span(s->room, 0);
    Py_RETURN_NONE;
}

static PyObject *Ring_publish(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (writer_only(self) < 0) return NULL;
    return PyLong_FromLong(do_publish(self));
}

/* write(data, flags=0) -> bool: reserve + copy + commit + publish; False when the ring is full. */
static PyObject *Ring_write(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) { PyErr_SetString(PyExc_TypeError, "write(data, flags=0)"); return NULL; }
    if (writer_only(self) < 0) return NULL;
    unsigned long flags = 0;
    if (nargs == 2) {
        flags = PyLong_AsUnsignedLong(args[1]);
        if (PyErr_Occurred()) return NULL;
        if (flags & ~(FR_F_MORE | FR_F_CLOSE)) { PyErr_SetString(PyExc_ValueError, "write takes F_MORE and F_CLOSE only"); return NULL; }
    }
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0) return NULL;
    int ok = append_record(self, b.buf, (uint64_t)b.len, (uint32_t)flags);
    PyBuffer_Release(&b);
    if (ok < 0) return NULL;
    if (!ok) Py_RETURN_FALSE;
    do_publish(self);
    Py_RETURN_TRUE;
}

/* write_many(seq) -> int: messages written, in order, each one record, with one TAIL store and
 * one doorbell. Stops at the first that does not fit now, or that is larger than one record
 * (the caller sends that one another way). Counted in msgs/nbytes like the hot path. */
static PyObject *Ring_write_many(Ring *self, PyObject *seq) {
    if (writer_only(self) < 0) return NULL;
    PyObject *fast = PySequence_Fast(seq, "write_many takes a sequence of bytes-like objects");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), done = 0;
    PyObject **items = PySequence_Fast_ITEMS(fast);
    uint64_t limit = self->frag ? self->frag : self->max_record;
    for (; done < n; done++) {
        Py_buffer b;
        if (PyObject_GetBuffer(items[done], &b, PyBUF_SIMPLE) < 0) { Py_DECREF(fast); return NULL; }
        int ok = (uint64_t)b.len > limit ? 0 : append_record(self, b.buf, (uint64_t)b.len, 0);
        if (ok > 0) { self->msgs++; self->bytes += (uint64_t)b.len; }
        PyBuffer_Release(&b);
        if (ok < 0) { Py_DECREF(fast); return NULL; }
        if (!ok) break;
    }
    Py_DECREF(fast);
    do_publish(self);
    return PyLong_FromSsize_t(done);
}

static PyObject *Ring_free(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (writer_only(self) < 0) return NULL;
    uint64_t head;
    if (load_head(self, &head) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(self->cap - (self->claim - head));
}

/* ------------------------------------------------------------------------------ reader */
static int load_tail(Ring *r, uint64_t *out) {
    /* SYNC POINT: acquire-load of TAIL; pairs with the writer's release-store in do_publish. */
    uint64_t tail = __atomic_load_n(&r->h->tail, __ATOMIC_ACQUIRE);
    if (tail < r->tail_cache || tail - r->head > r->cap) {
        proto_error("the writer moved TAIL to %llu (read up to %llu)", (unsigned long long)tail,
                    (unsigned long long)r->pos);
        return -1;
    }
    r->tail_cache = tail;
    *out = tail;
    return 0;
}

static int push_held(Ring *r, uint64_t pos, uint64_t span, int released) {
    void *arr = r->held;
    held_t *e = deque_push(&arr, &r->held0, r->nheld, &r->held_cap, sizeof(held_t));
    r->held = arr;
    if (!e) return -1;
    r->nheld++;
    e->pos = pos; e->span = span; e->released = released;
    return 0;
}

/* Move HEAD over the released prefix and ring the writer if it waits for space. */
static void advance_head(Ring *r) {
    size_t k = 0;
    uint64_t head = r->head;
    while (k < r->nheld && r->held[r->held0 + k].released) {
        head = r->held[r->held0 + k].pos + r->held[r->held0 + k].span;
        k++;
    }
    if (!k) return;
    r->held0 += k;
    r->nheld -= k;
    if (!r->nheld) r->held0 = 0;
    r->head = head;
    /* SYNC POINT: release-store of HEAD; pairs with the writer's acquire-load in load_head
     * (the writer reuses the space only after it sees this store). */
    __atomic_store_n(&r->h->head, head, __ATOMIC_RELEASE);
    ring_bell(&r->h->space_waiting, &r->h->space_bell, -1);
}

/* next record: 1 found (*rec filled, handed out), 0 none, -1 error */
typedef struct { uint64_t pos, offset, length, seq; uint32_t flags; } rec_t;

static int do_peek(Ring *r, rec_t *out) {
    for (;;) {
        uint64_t pos = r->pos, tail = r->tail_cache;
        if (tail <= pos && load_tail(r, &tail) < 0) return -1;
        if (tail <= pos) return 0;
        uint64_t off = pos & r->mask, to_end = r->cap - off;
        if (to_end < FR_RECORD_HEADER) {
            if (tail - pos < to_end) { proto_error("TAIL ends inside the gap at the end of the data area"); return -1; }
            r->pos = pos + to_end;
            if (push_held(r, pos, to_end, 1) < 0) return -1;
            advance_head(r);
            continue;
        }
        if (tail - pos < FR_RECORD_HEADER) { proto_error("TAIL ends inside a record header"); return -1; }
        volatile fr_record *rec = (volatile fr_record *)(r->data + off);
        uint32_t length = rec->length;  /* each field read once: the peer may change it */
        uint32_t flags = rec->flags;
        if ((flags & ~FR_KNOWN_FLAGS) || ((flags & FR_F_PAD) && flags != FR_F_PAD)) {
            proto_error("record flags 0x%x at position %llu", flags, (unsigned long long)pos);
            return -1;
        }
        uint32_t skip = rec->skip;
        if (skip & 7) { proto_error("record at %llu skips %u B (not a multiple of 8)", (unsigned long long)pos, skip); return -1; }
        uint64_t span = fr_span(length, skip);
        if (span > to_end || span > tail - pos) {
            proto_error("record of %u B at %llu runs past its bounds", length, (unsigned long long)pos);
            return -1;
        }
        if (flags == FR_F_PAD) {
            r->pos = pos + span;
            if (push_held(r, pos, span, 1) < 0) return -1;
            advance_head(r);
            continue;
        }
        uint64_t seq = rec->seq;
        if (seq != r->seq) {
            proto_error("sequence gap: expected %llu, got %llu", (unsigned long long)r->seq, (unsigned long long)seq);
            return -1;
        }
        uint32_t epoch = rec->epoch;
        if (epoch != r->epoch) { proto_error("record of epoch %u in epoch %u", epoch, r->epoch); return -1; }
        if ((flags & FR_F_CLOSE) && length) { proto_error("close record with a payload"); return -1; }
        r->seq++;
        r->pos = pos + span;
        if (push_held(r, pos, span, 0) < 0) return -1;
        out->pos = pos; out->offset = FR_HEADER_SIZE + off + FR_RECORD_HEADER;
        out->length = length; out->flags = flags; out->seq = seq;
        return 1;
    }
}

static int release_at(Ring *r, uint64_t pos) {
    for (size_t k = 0; k < r->nheld; k++) {
        held_t *e = &r->held[r->held0 + k];
        if (e->pos == pos) {
            if (e->released) break;
            e->released = 1;
            advance_head(r);
            return 0;
        }
    }
    PyErr_Format(PyExc_ValueError, "no record at position %llu is held (released twice?)", (unsigned long long)pos);
    return -1;
}

static PyObject *Ring_peek(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (reader_only(self) < 0) return NULL;
    rec_t rec;
    int ok = do_peek(self, &rec);
    if (ok < 0) return NULL;
    if (!ok) Py_RETURN_NONE;
    return Py_BuildValue("KKKIK", (unsigned long long)rec.pos, (unsigned long long)rec.offset,
                         (unsigned long long)rec.length, rec.flags, (unsigned long long)rec.seq);
}

static PyObject *Ring_release(Ring *self, PyObject *arg) {
    if (reader_only(self) < 0) return NULL;
    unsigned long long pos = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (release_at(self, pos) < 0) return NULL;
    Py_RETURN_NONE;
}

/* Copy a record's payload out and release it. */
static PyObject *take_bytes(Ring *r, const rec_t *rec) {
    PyObject *data = PyBytes_FromStringAndSize((const char *)r->view.buf + rec->offset, (Py_ssize_t)rec->length);
    if (data && release_at(r, rec->pos) < 0) Py_CLEAR(data);
    return data;
}

/* read() -> (bytes, flags) | None: peek + copy + release. */
static PyObject *Ring_read(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (reader_only(self) < 0) return NULL;
    rec_t rec;
    int ok = do_peek(self, &rec);
    if (ok < 0) return NULL;
    if (!ok) Py_RETURN_NONE;
    PyObject *data = take_bytes(self, &rec);
    return data ? Py_BuildValue("NI", data, rec.flags) : NULL;
}

/* read_plain() -> bytes | None: the next record if it is a whole message (no flags); None when
 * nothing is ready or the next record needs the general path (peek). Consumes only what it
 * returns. */
static PyObject *Ring_read_plain(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (reader_only(self) < 0) return NULL;
    uint64_t pos = self->pos, tail = self->tail_cache;
    if (tail <= pos) {
        if (load_tail(self, &tail) < 0) return NULL;
        if (tail <= pos) Py_RETURN_NONE;
    }
    uint64_t off = pos & self->mask;
    if (self->cap - off >= FR_RECORD_HEADER && tail - pos >= FR_RECORD_HEADER &&
        ((volatile fr_record *)(self->data + off))->flags != 0)
        Py_RETURN_NONE; /* flagged (or padding): the general path decides */
    rec_t rec;
    uint64_t seq_before = self->seq;
    int ok = do_peek(self, &rec);
    if (ok < 0) return NULL;
    if (!ok) Py_RETURN_NONE;
    if (rec.flags) {
        /* the peer changed the flags between our two reads: give the record back unread */
        self->seq = seq_before;
        self->pos = rec.pos;
        self->nheld--;
        Py_RETURN_NONE;
    }
    return take_bytes(self, &rec);
}

/* ------------------------------------------------------------------------------ hot path */
/* send(data, timeout=None): a whole message in one record when it fits now; anything else (a
 * timeout, a full ring, a large message, a failed connection) goes to the Python slow path. */
static PyObject *Ring_send(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    int plain = nargs == 1 && nkw == 0;
    if (!plain && nargs + nkw == 2) { /* send(data, None) or send(data, timeout=None) */
        plain = args[1] == Py_None;
    }
    if (plain && !self->gate && self->writer && self->has_view && !self->closing && self->slow) {
        Py_buffer b;
        if (PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) == 0) {
            int ok = (uint64_t)b.len <= self->frag ? append_record(self, b.buf, (uint64_t)b.len, 0) : 0;
            if (ok > 0) { self->msgs++; self->bytes += (uint64_t)b.len; }
            PyBuffer_Release(&b);
            if (ok < 0) return NULL;
            if (ok) { do_publish(self); Py_RETURN_NONE; }
        } else {
            PyErr_Clear(); /* not a simple buffer: the slow path says what is wrong */
        }
    }
    if (!self->slow) { PyErr_SetString(ConnectionClosed, "connection is closed"); return NULL; }
    return PyObject_Vectorcall(self->slow, args, (size_t)nargs, kwnames);
}

/* recv(timeout=None): the next record when it is a whole message; else the slow path. */
static PyObject *Ring_recv(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (!self->gate && !self->writer && self->has_view && !self->closing && self->slow) {
        PyObject *m = Ring_read_plain(self, NULL);
        if (!m) return NULL;
        if (m != Py_None) {
            self->msgs++;
            self->bytes += (uint64_t)PyBytes_GET_SIZE(m);
            return m;
        }
        Py_DECREF(m);
    }
    if (!self->slow) { PyErr_SetString(ConnectionClosed, "connection is closed"); return NULL; }
    return PyObject_Vectorcall(self->slow, args, (size_t)nargs, kwnames);
}

/* hot(slow, frag): install the slow path (None: remove it, breaking the reference cycle). */
static PyObject *Ring_hot(Ring *self, PyObject *args) {
    PyObject *slow; unsigned long long frag = 0;
    if (!PyArg_ParseTuple(args, "O|K", &slow, &frag)) return NULL;
    if (slow != Py_None && !PyCallable_Check(slow)) { PyErr_SetString(PyExc_TypeError, "slow must be callable"); return NULL; }
    Py_XSETREF(self->slow, slow == Py_None ? NULL : Py_NewRef(slow));
    if (frag > self->max_record) frag = self->max_record;
    self->frag = frag;
    Py_RETURN_NONE;
}

static PyObject *Ring_available(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (reader_only(self) < 0) return NULL;
    uint64_t tail;
    if (self->tail_cache > self->pos) Py_RETURN_TRUE;
    if (load_tail(self, &tail) < 0) return NULL;
    return PyBool_FromLong(tail > self->pos);
}

/* ------------------------------------------------------------------------------ waiting */
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

/* wait(need, mode, slice_ns, spin_ns) -> bool (ready). mode: an fr_wait_mode.
 * Waits at most one slice, without the GIL; the caller loops, checking liveness and signals. */
static PyObject *Ring_wait(Ring *self, PyObject *args) {
    unsigned long long need, slice_ns, spin_ns; int m;
    if (check_open(self) < 0 || !PyArg_ParseTuple(args, "KiKK", &need, &m, &slice_ns, &spin_ns)) return NULL;
    if (m < FR_MODE_SPIN || m > FR_MODE_ADAPTIVE) { PyErr_SetString(PyExc_ValueError, "mode must be 0 (spin), 1 (futex) or 2 (adaptive)"); return NULL; }
    fr_wait_mode mode = (fr_wait_mode)m;
    fr_header *h = self->h;
    uint32_t *flag = self->writer ? &h->space_waiting : &h->data_waiting;
    uint32_t *bell = self->writer ? &h->space_bell : &h->data_bell;
    uint32_t *mine = self->writer ? &h->writer_cpu : &h->reader_cpu;
    uint32_t *theirs = self->writer ? &h->reader_cpu : &h->writer_cpu;
    int ok = 0;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    uint64_t start = now_ns(), end = start + slice_ns;
    int cpu = sched_getcpu();
    /* SYNC POINT: none; a relaxed store of a hint (this side's CPU, 0 = unknown) that the
     * peer's relaxed load below reads when it chooses whether to spin: stale is harmless. */
    __atomic_store_n(mine, (uint32_t)(cpu + 1), __ATOMIC_RELAXED);
    uint64_t spin_until = mode == FR_MODE_SPIN ? end : mode == FR_MODE_ADAPTIVE ? start + spin_ns : start;
    /* SYNC POINT: none; the relaxed load of the peer's hint (see above). */
    if (mode == FR_MODE_ADAPTIVE && __atomic_load_n(theirs, __ATOMIC_RELAXED) == (uint32_t)(cpu + 1))
        spin_until = start; /* the peer last ran on this CPU: spinning would only delay it */
    for (unsigned i = 0;; i++) {
        if ((ok = ready(self, need))) break;
        /* SYNC POINT: none; a relaxed load of our own flag, set by interrupt() on another
         * thread of this process (the bell it rings ends a futex wait below). */
        if (__atomic_load_n(&self->stop, __ATOMIC_RELAXED)) break;
        if ((i & 255) == 255) {
            uint64_t t = now_ns();
            if (t >= spin_until) break;
        }
        cpu_relax();
    }
    if (!ok && mode == FR_MODE_ADAPTIVE) {
        for (int k = 0; k < 4 && !(ok = ready(self, need)); k++) sched_yield();
    }
    /* SYNC POINT: none; the relaxed load of our own stop flag again (see the spin loop). */
    while (!ok && mode != FR_MODE_SPIN && !__atomic_load_n(&self->stop, __ATOMIC_RELAXED)) {
        uint64_t t = now_ns();
        if (t >= end) break;
        /* SYNC POINT: acquire-load of the bell before the flag is set; pairs with the release
         * fetch_add in ring_bell, so a ring between here and FUTEX_WAIT makes the wait return. */
        uint32_t b = __atomic_load_n(bell, __ATOMIC_ACQUIRE);
        /* SYNC POINT: seq_cst fetch_or of the waiters flag, then re-check; pairs with the
         * fence in the peer's ring_bell. */
        __atomic_fetch_or(flag, FR_WAIT_FUTEX, __ATOMIC_SEQ_CST);
        /* SYNC POINT: none; clearing our own bit (relaxed): a ring that finds it set after we
         * stopped waiting costs one spare wake-up, never a lost one. (Also below.) */
        if ((ok = ready(self, need))) { __atomic_fetch_and(flag, ~FR_WAIT_FUTEX, __ATOMIC_RELAXED); break; }
        int err = futex_wait(bell, b, end - t);
        __atomic_fetch_and(flag, ~FR_WAIT_FUTEX, __ATOMIC_RELAXED);
        ok = ready(self, need);
        if (err == EINTR) break; /* back to Python so the signal handler runs now */
    }
    Py_END_ALLOW_THREADS
    self->busy--;
    if (self->closing) ring_release_view(self);
    return PyBool_FromLong(ok);
}

/* interrupt(on): while on, a wait of this side returns at once (False unless ready): another
 * thread of this process is closing the connection. Turning it on wakes a wait in progress: the
 * bell this side sleeps on changes (a FUTEX_WAIT about to start returns at once) and is woken.
 * The peer only ever sees one spare ring of a bell that wakes nobody but us. */
static PyObject *Ring_interrupt(Ring *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    /* SYNC POINT: a release store of our flag; the waiting thread's relaxed loads see it at
     * the latest after the futex wake below (a system call each side). */
    __atomic_store_n(&self->stop, on, __ATOMIC_RELEASE);
    if (on && self->has_view && !self->closing) {
        uint32_t *bell = self->writer ? &self->h->space_bell : &self->h->data_bell;
        /* SYNC POINT: release increment of the bell we wait on; pairs with the acquire load
         * of the bell in Ring_wait, like a ring from the peer. */
        __atomic_fetch_add(bell, 1, __ATOMIC_RELEASE);
        futex_wake(bell);
    }
    Py_RETURN_NONE;
}

/* arm() -> bool: set the event bit so the writer signals our eventfd on its next publish;
 * True when data is already there (then nothing is armed and the caller reads instead). */
static PyObject *Ring_arm(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (reader_only(self) < 0) return NULL;
    /* SYNC POINT: seq_cst fetch_or, then re-check TAIL; pairs with the fence in ring_bell. */
    __atomic_fetch_or(&self->h->data_waiting, FR_WAIT_EVENT, __ATOMIC_SEQ_CST);
    if (ready(self, 0)) {
        /* SYNC POINT: none; clearing our own bit (relaxed): at worst one spare eventfd write. */
        __atomic_fetch_and(&self->h->data_waiting, ~FR_WAIT_EVENT, __ATOMIC_RELAXED);
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

/* note_cpu(): publish the CPU this thread runs on in this side's field of the ring. A side
 * waits on one ring but the peer looks for it on the other, so it notes itself on both. */
static PyObject *Ring_note_cpu(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (check_open(self) < 0) return NULL;
    int cpu = sched_getcpu();
    /* SYNC POINT: none; the relaxed store of the CPU hint that Ring_wait's peer reads. */
    __atomic_store_n(self->writer ? &self->h->writer_cpu : &self->h->reader_cpu, (uint32_t)(cpu + 1), __ATOMIC_RELAXED);
    return PyLong_FromLong(cpu);
}

/* disarm(): the reader consumed its wake-up (the C writer already cleared the flag when it rang;
 * a Python writer never clears it, so the reader does). */
static PyObject *Ring_disarm(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (reader_only(self) < 0) return NULL;
    /* SYNC POINT: none; clearing our own bit (relaxed): at worst one spare eventfd write. */
    __atomic_fetch_and(&self->h->data_waiting, ~FR_WAIT_EVENT, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------ type */
static PyObject *Ring_get_seq(Ring *self, void *c) { return PyLong_FromUnsignedLongLong(self->seq); }
static PyObject *Ring_get_epoch(Ring *self, void *c) { return PyLong_FromUnsignedLong(self->epoch); }
static PyObject *Ring_get_capacity(Ring *self, void *c) { return PyLong_FromUnsignedLongLong(self->cap); }
static PyObject *Ring_get_max_record(Ring *self, void *c) { return PyLong_FromUnsignedLongLong(self->max_record); }
static PyObject *Ring_get_pending(Ring *self, void *c) { return PyLong_FromSize_t(self->nslots); }
static PyObject *Ring_get_msgs(Ring *self, void *c) { return PyLong_FromUnsignedLongLong(self->msgs); }
static PyObject *Ring_get_bytes(Ring *self, void *c) { return PyLong_FromUnsignedLongLong(self->bytes); }
static PyObject *Ring_get_gate(Ring *self, void *c) { return PyBool_FromLong(self->gate); }
static int Ring_set_gate(Ring *self, PyObject *v, void *c) {
    int t = v ? PyObject_IsTrue(v) : 0;
    if (t < 0) return -1;
    self->gate = t;
    return 0;
}
static PyObject *Ring_get_held(Ring *self, void *c) {
    size_t n = 0;
    for (size_t k = 0; k < self->nheld; k++) n += !self->held[self->held0 + k].released;
    return PyLong_FromSize_t(n);
}

static PyGetSetDef Ring_getset[] = {
    {"seq", (getter)Ring_get_seq, NULL, "next sequence number", NULL},
    {"epoch", (getter)Ring_get_epoch, NULL, "epoch written into / expected in records", NULL},
    {"capacity", (getter)Ring_get_capacity, NULL, "data area size", NULL},
    {"max_record", (getter)Ring_get_max_record, NULL, "largest record payload (writer)", NULL},
    {"pending", (getter)Ring_get_pending, NULL, "reserved records not yet published (writer)", NULL},
    {"held", (getter)Ring_get_held, NULL, "records handed out, not released (reader)", NULL},
    {"msgs", (getter)Ring_get_msgs, NULL, "messages the hot path moved", NULL},
    {"nbytes", (getter)Ring_get_bytes, NULL, "bytes the hot path moved", NULL},
    {"gate", (getter)Ring_get_gate, (setter)Ring_set_gate, "True: send/recv take the slow path", NULL},
    {NULL},
};

static PyMethodDef Ring_methods[] = {
    {"reserve", (PyCFunction)Ring_reserve, METH_O, "reserve(length) -> (pos, offset, room) | None"},
    {"commit", (PyCFunction)Ring_commit, METH_VARARGS, "commit(pos, length, flags=0)"},
    {"abort", (PyCFunction)Ring_abort, METH_O, "abort(pos): the reservation becomes padding"},
    {"publish", (PyCFunction)Ring_publish, METH_NOARGS, "publish() -> records made visible"},
    {"write", (PyCFunction)(void (*)(void))Ring_write, METH_FASTCALL, "write(data, flags=0) -> bool"},
    {"write_many", (PyCFunction)Ring_write_many, METH_O, "write_many(seq) -> messages written"},
    {"free", (PyCFunction)Ring_free, METH_NOARGS, "free() -> bytes free now"},
    {"peek", (PyCFunction)Ring_peek, METH_NOARGS, "peek() -> (pos, offset, length, flags, seq) | None"},
    {"release", (PyCFunction)Ring_release, METH_O, "release(pos)"},
    {"read", (PyCFunction)Ring_read, METH_NOARGS, "read() -> (bytes, flags) | None"},
    {"read_plain", (PyCFunction)Ring_read_plain, METH_NOARGS, "read_plain() -> bytes | None"},
    {"available", (PyCFunction)Ring_available, METH_NOARGS, "available() -> bool"},
    {"wait", (PyCFunction)Ring_wait, METH_VARARGS, "wait(need, mode, slice_ns, spin_ns) -> bool"},
    {"arm", (PyCFunction)Ring_arm, METH_NOARGS, "arm() -> bool (True: data already there)"},
    {"disarm", (PyCFunction)Ring_disarm, METH_NOARGS, "disarm(): clear the event bit"},
    {"note_cpu", (PyCFunction)Ring_note_cpu, METH_NOARGS, "note_cpu() -> this thread's CPU, published in the ring"},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "close(): let go of the memory"},
    {"interrupt", (PyCFunction)Ring_interrupt, METH_O, "interrupt(on): waits return at once while on"},
    {"send", (PyCFunction)(void (*)(void))Ring_send, METH_FASTCALL | METH_KEYWORDS, "send(data, timeout=None): the Connection's send"},
    {"recv", (PyCFunction)(void (*)(void))Ring_recv, METH_FASTCALL | METH_KEYWORDS, "recv(timeout=None): the Connection's recv"},
    {"hot", (PyCFunction)Ring_hot, METH_VARARGS, "hot(slow, frag=0): install the slow path"},
    {NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fable._core.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ring(mem, writer, epoch=0, first_seq=0, eventfd=-1): one side of a shared-memory ring",
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
    .tp_init = (initproc)Ring_init,
    .tp_new = PyType_GenericNew,
};

/* ---------------------------------------------------------------- vmsplice
 * vmsplice(fd, bufs) -> bytes taken: hand the pages under ``bufs`` (buffer objects, at most
 * IOV_MAX) to the pipe ``fd`` without copying them, never blocking (SPLICE_F_NONBLOCK: a full
 * pipe raises BlockingIOError). The kernel may take fewer bytes than offered; the caller loops.
 * The pages stay referenced by the pipe until the reader has read them: the caller must not
 * change or unmap them before then (vmsplice-coop learns that from the reader's tokens). */
static PyObject *core_vmsplice(PyObject *Py_UNUSED(mod), PyObject *args) {
    int fd;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "iO:vmsplice", &fd, &seq)) return NULL;
    PyObject *fast = PySequence_Fast(seq, "vmsplice needs a sequence of buffers");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n < 1 || n > IOV_MAX) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "vmsplice takes 1..%d buffers", IOV_MAX);
        return NULL;
    }
    Py_buffer *views = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
    struct iovec *iov = PyMem_Calloc((size_t)n, sizeof(struct iovec));
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    if (!views || !iov) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, got), &views[got], PyBUF_SIMPLE) < 0)
            goto done;
        iov[got].iov_base = views[got].buf;
        iov[got].iov_len = (size_t)views[got].len;
    }
    ssize_t r;
    int err;
    Py_BEGIN_ALLOW_THREADS
    r = vmsplice(fd, iov, (unsigned long)n, SPLICE_F_NONBLOCK);
    err = errno;
    Py_END_ALLOW_THREADS
    if (r < 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    result = PyLong_FromSsize_t(r);
done:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(iov);
    Py_DECREF(fast);
    return result;
}

static PyMethodDef core_methods[] = {
    {"vmsplice", core_vmsplice, METH_VARARGS, "vmsplice(fd, bufs) -> bytes the pipe took (never blocks)"},
    {NULL},
};

static struct PyModuleDef coremodule = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fable._core",
    .m_doc = "the C fast path of fable: the shared-memory ring, and vmsplice",
    .m_size = -1,
    .m_methods = core_methods,
};

PyMODINIT_FUNC PyInit__core(void) {
    PyObject *errors = PyImport_ImportModule("fable.errors");
    if (!errors) return NULL;
    ProtocolError = PyObject_GetAttrString(errors, "ProtocolError");
    ConnectionClosed = PyObject_GetAttrString(errors, "ConnectionClosed");
    Py_DECREF(errors);
    if (!ProtocolError || !ConnectionClosed) return NULL;
    if (PyType_Ready(&RingType) < 0) return NULL;
    PyObject *m = PyModule_Create(&coremodule);
    if (!m) return NULL;
    Py_INCREF(&RingType);
    PyModule_AddObject(m, "Ring", (PyObject *)&RingType);
    PyObject *layout = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}",
        "MAGIC_OFF", FR_MAGIC_OFF, "VERSION_OFF", FR_VERSION_OFF, "HEADER_SIZE_OFF", FR_HEADER_SIZE_OFF,
        "CAPACITY", FR_CAPACITY, "TAIL", FR_TAIL, "WRITER_CPU", FR_WRITER_CPU,
        "SPACE_WAITING", FR_SPACE_WAITING, "DATA_BELL", FR_DATA_BELL, "HEAD", FR_HEAD,
        "READER_CPU", FR_READER_CPU, "DATA_WAITING", FR_DATA_WAITING, "SPACE_BELL", FR_SPACE_BELL,
        "HEADER_SIZE", FR_HEADER_SIZE, "REC_LENGTH", FR_REC_LENGTH, "REC_FLAGS", FR_REC_FLAGS,
        "REC_SEQ", FR_REC_SEQ, "REC_EPOCH", FR_REC_EPOCH, "REC_SKIP", FR_REC_SKIP,
        "RECORD_HEADER", FR_RECORD_HEADER);
    if (!layout) return NULL;
    PyModule_AddObject(m, "LAYOUT", layout);
    PyObject *constants = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}",
        "F_MORE", FR_F_MORE, "F_CLOSE", FR_F_CLOSE, "F_PAD", FR_F_PAD,
        "WAITER_FUTEX", FR_WAIT_FUTEX, "WAITER_EVENT", FR_WAIT_EVENT,
        "WAIT_SPIN", FR_MODE_SPIN, "WAIT_FUTEX", FR_MODE_FUTEX, "WAIT_ADAPTIVE", FR_MODE_ADAPTIVE);
    if (!constants) return NULL;
    PyModule_AddObject(m, "CONSTANTS", constants);
    PyModule_AddIntConstant(m, "F_MORE", FR_F_MORE);
    PyModule_AddIntConstant(m, "F_CLOSE", FR_F_CLOSE);
    PyModule_AddIntConstant(m, "F_PAD", FR_F_PAD);
    PyObject *magic = PyLong_FromUnsignedLongLong(FR_MAGIC);
    if (!magic) return NULL;
    PyModule_AddObject(m, "MAGIC", magic);
    return m;
}
