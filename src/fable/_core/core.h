/* The parts of fable._core share this: the Ring object (one side of one ring) and what each
 * file offers the others. By job:
 *   ring.h  the shared-memory layout (mirrors src/fable/ring/layout.py, the diagram)
 *   ring.c  the protocol: writer (reserve, commit, publish) and reader (peek, release, read)
 *   wait.c  waiting for the peer: doorbells, futexes, spinning, without the GIL
 *   hot.c   the Connection's per-message calls (send, recv, recv_many, ...), which wait in C
 *   lend.c  the Buffer type and the buffer API's calls (getwritebuf, commit, getreadbuf, release)
 *   core.c  the type, its lifecycle, the module, and vmsplice()
 * Every value read from the peer's memory is read once and range-checked; a violation raises
 * fable.ProtocolError and nothing outside the mapping is ever touched. */
#ifndef FABLE_CORE_H
#define FABLE_CORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <time.h>

#include "ring.h"

#define FR_HIDDEN __attribute__((visibility("hidden")))

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* A record the writer reserved, until do_publish writes its header and moves TAIL over it. */
typedef enum {
    SLOT_RESERVED = 0,  /* handed out by reserve(), not yet committed: holds back later ones */
    SLOT_COMMITTED = 1, /* committed: published with its length and flags */
    SLOT_PADDING = 2,   /* aborted, or the gap at the end of the data area: published as F_PAD */
} slot_state;

typedef struct { uint64_t pos, room; int64_t length; uint32_t flags; slot_state state; } slot_t;
typedef struct { uint64_t pos, span; int released; } held_t;
/* a record the reader handed out */
typedef struct { uint64_t pos, offset, length, seq; uint32_t flags; } rec_t;

typedef struct Ring {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    int busy;           /* waits in progress without the GIL: do not release the memory */
    int stop;           /* interrupt(True) or close(): waits return at once */
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
    /* the Connection's hot path (hot.c): send/send_many on the writer, recv/recv_many/recv_into
     * on the reader; each goes to its Python slow path for everything but the common case */
    PyObject *slow, *slow_many, *slow_into;
    int gate;           /* set by Python while its own state needs the slow path */
    uint64_t frag;      /* largest message send() writes as one record */
    uint64_t msgs, bytes;
    /* how the hot path waits (set by waits(); mode < 0: it does not, the slow path does) */
    int wmode;
    uint64_t slice_ns, spin_ns;
    int live_fd;        /* polled after each slice: news on it (the peer closed, died, or
                           wrote a control record) sends the call to its slow path */
    Py_buffer hint_view; /* this side's CPU field in the pair's other ring (where the peer */
    int has_hint;        /* looks for it), noted before the hot path waits */
    uint32_t *cpu_hint;
    /* the buffer API's fast path (lend.c; set by lend()) */
    PyObject *owner;     /* the data path: the owner of the buffers handed out */
    PyObject *mem;       /* the ring's memory as a memoryview (read-only on the reader) */
    PyObject *slow_get, *slow_put; /* getwritebuf/commit (writer), getreadbuf/release (reader) */
    PyObject *epoch_obj; /* the epoch as an int, for the buffers */
    PyObject *spare;     /* reader, safe: a list of the bytes of released read buffers nobody
                            else holds, refilled by the next copies of their size (lend.c) */
    int unsafe;          /* reader: lends views of the ring, else private copies */
    int polled, armed;   /* reader: a readiness fd exists / is armed (the event bit is set) */
    int signalled;       /* reader: Python signalled its own readiness fd: its to undo */
    int bell_fd;         /* reader: this side's doorbell (the peer rings it when armed) */
    Py_ssize_t lent, lend_limit; /* reader: read buffers lent (either path), at most */
    uint64_t pinned, pin_limit;  /* reader: ring bytes under unsafe read buffers, at most */
    uint64_t burst;              /* reader, safe: a getreadbuf stops once it copied this many
                                    bytes (0: no bound); twice that is kept as spares */
    uint64_t next_look;          /* reader: when an empty getreadbuf lets Python look next */
    Py_ssize_t open_parts;       /* writer: records reserved by getwritebuf, not yet committed */
} Ring;

extern FR_HIDDEN PyObject *ProtocolError;    /* fable.errors.ProtocolError */
extern FR_HIDDEN PyObject *ConnectionClosed; /* fable.errors.ConnectionClosed */
extern FR_HIDDEN PyObject *DeadBuffer;       /* fable.errors.DeadBuffer */
extern FR_HIDDEN PyTypeObject BufferType;    /* fable.Buffer (lend.c) */

/* core.c */
FR_HIDDEN PyObject *proto_error(const char *fmt, ...);
FR_HIDDEN int check_open(Ring *r);
FR_HIDDEN void ring_release_view(Ring *r);

/* ring.c: the protocol (0/1 = no/yes, -1 = error set) */
FR_HIDDEN int writer_only(Ring *r);
FR_HIDDEN int reader_only(Ring *r);
FR_HIDDEN int append_record(Ring *r, const void *data, uint64_t len, uint32_t flags);
FR_HIDDEN int reserve_record(Ring *r, uint64_t length, uint64_t *pos, uint64_t *offset); /* 1/0 no room/-1 */
FR_HIDDEN int commit_record(Ring *r, uint64_t pos, uint64_t length, uint32_t flags);     /* 0/-1 */
FR_HIDDEN int abort_record(Ring *r, uint64_t pos);                                      /* 0/-1 */
FR_HIDDEN long do_publish(Ring *r);
FR_HIDDEN int do_peek(Ring *r, rec_t *out);
FR_HIDDEN int release_at(Ring *r, uint64_t pos);
FR_HIDDEN int peek_plain(Ring *r, rec_t *out);
FR_HIDDEN void unpeek(Ring *r, const rec_t *rec); /* give back the record just peeked */
FR_HIDDEN PyObject *take_bytes(Ring *r, const rec_t *rec); /* copy out + release */
FR_HIDDEN PyObject *copy_out(Ring *r, const rec_t *rec);   /* copy out, still held */
FR_HIDDEN PyObject *Ring_reserve(Ring *self, PyObject *arg);
FR_HIDDEN PyObject *Ring_commit(Ring *self, PyObject *args);
FR_HIDDEN PyObject *Ring_abort(Ring *self, PyObject *arg);
FR_HIDDEN PyObject *Ring_publish(Ring *self, PyObject *ignored);
FR_HIDDEN PyObject *Ring_write(Ring *self, PyObject *const *args, Py_ssize_t nargs);
FR_HIDDEN PyObject *Ring_write_many(Ring *self, PyObject *seq);
FR_HIDDEN PyObject *Ring_free(Ring *self, PyObject *ignored);
FR_HIDDEN PyObject *Ring_peek(Ring *self, PyObject *ignored);
FR_HIDDEN PyObject *Ring_release(Ring *self, PyObject *arg);
FR_HIDDEN PyObject *Ring_read(Ring *self, PyObject *ignored);
FR_HIDDEN PyObject *Ring_available(Ring *self, PyObject *ignored);

/* wait.c */
FR_HIDDEN void ring_bell(uint32_t *waiting, uint32_t *bell, int evfd, const uint64_t *wanted, uint64_t pos);
FR_HIDDEN void wake_own(Ring *r);
FR_HIDDEN int hot_wait(Ring *r, uint64_t need, uint64_t until);
FR_HIDDEN PyObject *Ring_wait(Ring *self, PyObject *args);
FR_HIDDEN PyObject *Ring_interrupt(Ring *self, PyObject *arg);
FR_HIDDEN int arm_event(Ring *r);     /* readiness: 1 = data already there (not armed) */
FR_HIDDEN void disarm_event(Ring *r);
FR_HIDDEN PyObject *Ring_arm(Ring *self, PyObject *ignored);
FR_HIDDEN PyObject *Ring_disarm(Ring *self, PyObject *ignored);
FR_HIDDEN PyObject *Ring_note_cpu(Ring *self, PyObject *ignored);

/* hot.c */
FR_HIDDEN PyObject *Ring_send(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
FR_HIDDEN PyObject *Ring_send_many(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
FR_HIDDEN PyObject *Ring_recv(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
FR_HIDDEN PyObject *Ring_recv_many(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
FR_HIDDEN PyObject *Ring_recv_into(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
FR_HIDDEN PyObject *Ring_hot(Ring *self, PyObject *args, PyObject *kw);
FR_HIDDEN int parse_timeout(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, Py_ssize_t at,
                            uint64_t *until, int *nowait);
FR_HIDDEN PyObject *call_slow(PyObject *slow, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                              Py_ssize_t at, uint64_t until);
FR_HIDDEN int record_waiting(Ring *r);
FR_HIDDEN uint64_t room_for(Ring *r, uint64_t len);

/* lend.c */
FR_HIDDEN int lend_init(void); /* at import: the Buffer type, interned names */
FR_HIDDEN PyObject *buffer_new(PyObject *data, PyObject *owner, PyObject *token, PyObject *epoch, int more,
                               int writable);
FR_HIDDEN PyObject *Ring_getwritebuf(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
FR_HIDDEN PyObject *Ring_commit_bufs(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
FR_HIDDEN PyObject *Ring_getreadbuf(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
FR_HIDDEN PyObject *Ring_release_buf(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);
FR_HIDDEN PyObject *Ring_lend(Ring *self, PyObject *args, PyObject *kw);
FR_HIDDEN PyObject *Ring_waits(Ring *self, PyObject *args);

#endif
