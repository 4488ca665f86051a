/* The zero-copy buffer API on a ring (fable._core): the Buffer type, and the Connection's
 * getwritebuf/commit on the writer and getreadbuf/release on the reader for the common case,
 * a message in one record. Like hot.c, each call goes to the Python slow path installed by
 * lend() for everything else: several fragments, a flagged record, the gate, a readiness fd
 * to arm, a limit reached (NoSpace), the periodic look at the peer, an argument of another
 * kind. The bookkeeping both paths share (read buffers lent, ring bytes they pin, write
 * records reserved) lives here, in the Ring, and Python reads and writes it as attributes.
 *
 * Buffer is the C twin of fable.buffer's reference class, with the same contract: a
 * single-owner view of transport memory; ``data`` raises DeadBuffer once the buffer was
 * committed, aborted or released; ``_take(owner)`` hands it back once and returns its token.
 * Tokens: a write buffer's is its record's position (an int: the claim of one record) or
 * (Claim, i); an unsafe read buffer's is (position, length); a safe read buffer's is None. */
#include "core.h"

#include <structmember.h>
#include <sys/socket.h>

FR_HIDDEN PyObject *DeadBuffer; /* fable.errors.DeadBuffer */
#define SPARE_MIN 4096 /* smaller copies come from Python's own allocator: nothing to keep */
static PyObject *str_release;   /* "release", interned (lend_init) */

FR_HIDDEN int lend_init(void) {
    str_release = PyUnicode_InternFromString("release");
    return str_release ? PyType_Ready(&BufferType) : -1;
}

/* ------------------------------------------------------------------------------ Buffer */
typedef struct {
    PyObject_HEAD
    PyObject *data; /* the memoryview; NULL once handed back */
    PyObject *owner, *token, *epoch;
    char more, writable;
} Buffer;

static PyObject *dead(void) {
    PyErr_SetString(DeadBuffer, "buffer was already committed, released or aborted");
    return NULL;
}

FR_HIDDEN PyObject *buffer_new(PyObject *data, PyObject *owner, PyObject *token, PyObject *epoch, int more,
                               int writable) {
    Buffer *b = PyObject_GC_New(Buffer, &BufferType);
    if (!b) return NULL;
    b->data = Py_NewRef(data);
    b->owner = Py_NewRef(owner);
    b->token = Py_NewRef(token);
    b->epoch = Py_NewRef(epoch);
    b->more = (char)more;
    b->writable = (char)writable;
    PyObject_GC_Track(b);
    return (PyObject *)b;
}

static PyObject *Buffer_tp_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"data", "owner", "token", "more", "epoch", "writable", NULL};
    PyObject *data, *owner, *token, *epoch = NULL;
    int more = -1, writable = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|$pOp:Buffer", kwlist, &data, &owner, &token, &more, &epoch,
                                     &writable))
        return NULL;
    if (more < 0 || writable < 0 || !epoch) {
        PyErr_SetString(PyExc_TypeError, "Buffer() needs the keywords more, epoch and writable");
        return NULL;
    }
    return buffer_new(data, owner, token, epoch, more, writable);
}

static int Buffer_traverse(Buffer *b, visitproc visit, void *arg) {
    Py_VISIT(b->data);
    Py_VISIT(b->owner);
    Py_VISIT(b->token);
    Py_VISIT(b->epoch);
    return 0;
}

static int Buffer_clear(Buffer *b) {
    Py_CLEAR(b->data);
    Py_CLEAR(b->owner);
    Py_CLEAR(b->token);
    Py_CLEAR(b->epoch);
    return 0;
}

static void Buffer_dealloc(Buffer *b) {
    PyObject_GC_UnTrack(b);
    Buffer_clear(b);
    PyObject_GC_Del(b);
}

static PyObject *Buffer_get_data(Buffer *b, void *c) { return b->data ? Py_NewRef(b->data) : dead(); }
static PyObject *Buffer_get_alive(Buffer *b, void *c) { return PyBool_FromLong(b->data != NULL); }
static PyObject *Buffer_get_owner(Buffer *b, void *c) { return Py_NewRef(b->owner); }
static PyObject *Buffer_get_raw(Buffer *b, void *c) { return Py_NewRef(b->data ? b->data : Py_None); }
static PyObject *Buffer_get_token(Buffer *b, void *c) { return Py_NewRef(b->token); }

static Py_ssize_t Buffer_len(Buffer *b) {
    if (!b->data) { dead(); return -1; }
    return PyMemoryView_Check(b->data) ? PyMemoryView_GET_BUFFER(b->data)->len : PyObject_Size(b->data);
}

/* Hand the buffer back to its owner: DeadBuffer if it was already, or belongs to another
 * owner; else it is dead from now on, and its token comes back (a new reference). */
static PyObject *take(Buffer *b, PyObject *owner) {
    if (!b->data) return dead();
    if (owner != b->owner) {
        PyErr_SetString(DeadBuffer, "buffer belongs to another connection");
        return NULL;
    }
    Py_CLEAR(b->data);
    return Py_NewRef(b->token);
}

static PyObject *Buffer_take(Buffer *b, PyObject *owner) { return take(b, owner); }

static PyObject *Buffer_repr(Buffer *b) {
    const char *kind = b->writable ? "write" : "read", *more = b->more ? "True" : "False";
    if (!b->data) return PyUnicode_FromFormat("<fable.Buffer %s dead epoch=%R more=%s>", kind, b->epoch, more);
    Py_ssize_t n = Buffer_len(b);
    if (n < 0) return NULL;
    return PyUnicode_FromFormat("<fable.Buffer %s %zd B epoch=%R more=%s>", kind, n, b->epoch, more);
}

static PyMemberDef Buffer_members[] = {
    {"epoch", T_OBJECT_EX, offsetof(Buffer, epoch), 0, "the transport generation the buffer came from"},
    {"more", T_BOOL, offsetof(Buffer, more), 0, "a read buffer: further fragments of its message follow"},
    {"writable", T_BOOL, offsetof(Buffer, writable), 0, "a write buffer (getwritebuf), not a read buffer"},
    {NULL},
};

static PyGetSetDef Buffer_getset[] = {
    {"data", (getter)Buffer_get_data, NULL, "the buffer's memory (DeadBuffer once handed back)", NULL},
    {"alive", (getter)Buffer_get_alive, NULL, "True until the buffer is committed, released or aborted", NULL},
    {"owner", (getter)Buffer_get_owner, NULL, "the data path that handed the buffer out", NULL},
    {"_data", (getter)Buffer_get_raw, NULL, "(transports) the memory, None once handed back", NULL},
    {"_owner", (getter)Buffer_get_owner, NULL, "(transports) the owner", NULL},
    {"_token", (getter)Buffer_get_token, NULL, "(transports) what the owner needs to take it back", NULL},
    {NULL},
};

static PyMethodDef Buffer_methods[] = {
    {"_take", (PyCFunction)Buffer_take, METH_O, "_take(owner) -> token: hand the buffer back (transports)"},
    {NULL},
};

static PySequenceMethods Buffer_as_sequence = {.sq_length = (lenfunc)Buffer_len};

FR_HIDDEN PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fable.Buffer",
    .tp_basicsize = sizeof(Buffer),
    .tp_dealloc = (destructor)Buffer_dealloc,
    .tp_repr = (reprfunc)Buffer_repr,
    .tp_as_sequence = &Buffer_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A fragment of a message: data (a memoryview), more, epoch, writable (see fable.buffer)",
    .tp_traverse = (traverseproc)Buffer_traverse,
    .tp_clear = (inquiry)Buffer_clear,
    .tp_methods = Buffer_methods,
    .tp_members = Buffer_members,
    .tp_getset = Buffer_getset,
    .tp_new = Buffer_tp_new,
};

/* ------------------------------------------------------------------------------ the calls */
#define LOOK_NS 20000000ULL /* an empty getreadbuf lets Python look at the peer this often */

/* The buffer calls of a side whose fast path may run now. */
static int lend_ok(Ring *r, int writer) {
    return !r->gate && r->writer == writer && r->has_view && !r->closing && r->owner && r->mem;
}

/* Call a slow path with the call's own arguments. */
static PyObject *slow(PyObject *fn, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (!fn) { PyErr_SetString(ConnectionClosed, "connection is closed"); return NULL; }
    return PyObject_Vectorcall(fn, args, (size_t)nargs, kwnames);
}

/* getwritebuf(size, timeout=None) -> [Buffer]: one record's room, waiting for it. */
FR_HIDDEN PyObject *Ring_getwritebuf(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    uint64_t until = 0, pos, offset;
    int nowait = 0;
    if (nargs >= 1 && PyLong_CheckExact(args[0]) && lend_ok(self, 1) &&
        parse_timeout(args, nargs, kwnames, 1, &until, &nowait)) {
        long long size = PyLong_AsLongLong(args[0]);
        if (size == -1 && PyErr_Occurred()) PyErr_Clear();
        else if (size >= 0 && (uint64_t)size <= self->frag && (uint64_t)size <= self->cap / 2) {
            while (lend_ok(self, 1)) {
                int ok = reserve_record(self, (uint64_t)size, &pos, &offset);
                if (ok < 0) return NULL;
                if (ok) {
                    PyObject *view = PySequence_GetSlice(self->mem, (Py_ssize_t)offset, (Py_ssize_t)(offset + size));
                    PyObject *token = view ? PyLong_FromUnsignedLongLong(pos) : NULL;
                    PyObject *buf = token ? buffer_new(view, self->owner, token, self->epoch_obj, 0, 1) : NULL;
                    Py_XDECREF(view);
                    Py_XDECREF(token);
                    PyObject *out = buf ? PyList_New(1) : NULL;
                    if (!out) {
                        Py_XDECREF(buf);
                        (void)abort_record(self, pos);
                        do_publish(self);
                        return NULL;
                    }
                    PyList_SET_ITEM(out, 0, buf);
                    self->open_parts++;
                    return out;
                }
                do_publish(self); /* a batch waiting for room must let the reader see it */
                if (nowait || self->wmode < 0) break;
                ok = hot_wait(self, room_for(self, (uint64_t)size), until);
                if (ok < 0) return NULL;
                if (!ok) break;
            }
        }
    }
    return call_slow(self->slow_get, args, nargs, kwnames, 1, until);
}

/* A keyword argument of a call: 1/0 for True/False, `dflt` when absent, -1 when it is not a
 * bool (the slow path then says what is wrong); *seen counts the keywords found. */
static int bool_kw(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *name, int dflt,
                   Py_ssize_t *seen) {
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, i), name) == 0) {
            PyObject *v = args[nargs + i];
            ++*seen;
            return v == Py_True ? 1 : v == Py_False ? 0 : -1;
        }
    }
    return dflt;
}

/* commit(bufs, nbytes, *, flush=True, more=False): the one buffer of a one-record claim. */
FR_HIDDEN PyObject *Ring_commit_bufs(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    Py_ssize_t seen = 0;
    int flush = bool_kw(args, nargs, kwnames, "flush", 1, &seen);
    int more = bool_kw(args, nargs, kwnames, "more", 0, &seen);
    if (nargs == 2 && flush >= 0 && more >= 0 && seen == (kwnames ? PyTuple_GET_SIZE(kwnames) : 0) &&
        lend_ok(self, 1) && (PyList_CheckExact(args[0]) || PyTuple_CheckExact(args[0])) &&
        PySequence_Fast_GET_SIZE(args[0]) == 1 && PyLong_CheckExact(args[1])) {
        Buffer *b = (Buffer *)PySequence_Fast_GET_ITEM(args[0], 0);
        if (Py_IS_TYPE(b, &BufferType) && b->data && b->owner == self->owner && b->writable &&
            PyLong_CheckExact(b->token) && PyMemoryView_Check(b->data)) {
            long long n = PyLong_AsLongLong(args[1]);
            unsigned long long pos = PyLong_AsUnsignedLongLong(b->token);
            if (PyErr_Occurred()) PyErr_Clear();
            else if (n >= 0 && n <= PyMemoryView_GET_BUFFER(b->data)->len) {
                if (commit_record(self, pos, (uint64_t)n, more ? FR_F_MORE : 0) < 0) return NULL;
                Py_CLEAR(b->data);
                self->open_parts--;
                self->bytes += (uint64_t)n;
                if (!more) self->msgs++;
                if (flush) do_publish(self);
                Py_RETURN_NONE;
            }
        }
    }
    return slow(self->slow_put, args, nargs, kwnames);
}

/* A safe read buffer's copy of `rec`: a spare (the bytes of a buffer released earlier, refilled)
 * when there is one of its size, else a new bytes object. Reusing the memory a reader gave back
 * matters at large sizes: freeing a burst of 64 KiB copies and asking for them again lets glibc
 * trim the heap in between, and each message then page-faults its copy back in (16 faults at
 * 64 KiB). Refilling bytes in place is sound only while nobody else can see them: a spare is
 * kept only with a reference count of one (keep_spare), the list is the ring's alone (not even
 * the garbage collector visits it), and the cached hash is reset.
 * The spares are one size (a release of another size starts over), at most twice the bytes one
 * getreadbuf copies (r->burst): what a reader that releases each call's buffers before the
 * next call gives back. */
static PyObject *spare_copy(Ring *r, const rec_t *rec) {
    Py_ssize_t n = r->spare ? PyList_GET_SIZE(r->spare) : 0;
    PyObject *b = n ? PyList_GET_ITEM(r->spare, n - 1) : NULL;
    if (!b || PyBytes_GET_SIZE(b) != (Py_ssize_t)rec->length) return copy_out(r, rec);
    Py_INCREF(b);
    if (PyList_SetSlice(r->spare, n - 1, n, NULL) < 0) { /* (cannot fail: shrinking) */
        Py_DECREF(b);
        return NULL;
    }
    memcpy(PyBytes_AS_STRING(b), (const char *)r->view.buf + rec->offset, (size_t)rec->length);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    ((PyBytesObject *)b)->ob_shash = -1;
#pragma GCC diagnostic pop
    return b;
}

/* After a safe read buffer's view over `bytes` was released: keep `bytes` as a spare if it is big
 * enough to matter, nobody else holds it (the caller's reference is the only one), and the
 * spares have room. Never fails (a spare not kept is freed). */
static void keep_spare(Ring *r, PyObject *bytes) {
    Py_ssize_t size = PyBytes_CheckExact(bytes) ? PyBytes_GET_SIZE(bytes) : 0;
    if (size < SPARE_MIN || Py_REFCNT(bytes) != 1 || (uint64_t)size > r->burst) return;
    if (!r->spare && !(r->spare = PyList_New(0))) {
        PyErr_Clear();
        return;
    }
    Py_ssize_t n = PyList_GET_SIZE(r->spare);
    if (n && PyBytes_GET_SIZE(PyList_GET_ITEM(r->spare, 0)) != size) {
        (void)PyList_SetSlice(r->spare, 0, n, NULL);
        n = 0;
    }
    if ((uint64_t)((n + 1) * size) <= 2 * r->burst && PyList_Append(r->spare, bytes) < 0) PyErr_Clear();
}

/* One read buffer over `rec`: a private copy or, unsafe, a read-only view of the ring; the record
 * stays peeked (the caller releases a copy's once the buffer is handed over; a view's is held
 * until release); NULL with the record given back on error. */
static PyObject *lend_record(Ring *r, const rec_t *rec) {
    PyObject *view, *token, *buf;
    if (r->unsafe) {
        view = PySequence_GetSlice(r->mem, (Py_ssize_t)rec->offset, (Py_ssize_t)(rec->offset + rec->length));
        PyObject *pos = view ? PyLong_FromUnsignedLongLong(rec->pos) : NULL;
        PyObject *len = pos ? PyLong_FromUnsignedLongLong(rec->length) : NULL;
        token = len ? PyTuple_Pack(2, pos, len) : NULL;
        Py_XDECREF(pos);
        Py_XDECREF(len);
    } else {
        PyObject *copy = spare_copy(r, rec);
        view = copy ? PyMemoryView_FromObject(copy) : NULL;
        Py_XDECREF(copy);
        token = Py_NewRef(Py_None);
    }
    buf = view && token ? buffer_new(view, r->owner, token, r->epoch_obj, 0, 0) : NULL;
    Py_XDECREF(view);
    Py_XDECREF(token);
    if (!buf) unpeek(r, rec);
    return buf;
}

/* Readiness (a reader with a fileno): the call after an empty one consumes the wake-ups of its
 * arming (the event bit, the peer's bytes on the doorbell), as the slow path does: reads of
 * the doorbell, never blocking, bounded (a peer that keeps ringing cannot keep us here), with
 * the GIL released like any socket read (a loop of such calls must not starve other threads;
 * r->busy keeps a close on another thread from freeing the fd and memory meanwhile). 0 when
 * the call may go on, -1 when the ring closed meanwhile (the slow path then says so). */
static int disarm_and_drain(Ring *r) {
    char sink[4096];
    r->armed = 0;
    disarm_event(r);
    if (r->bell_fd < 0) return 0;
    r->busy++;
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < 16; i++)
        if (recv(r->bell_fd, sink, sizeof sink, MSG_DONTWAIT) < (ssize_t)sizeof sink) break;
    Py_END_ALLOW_THREADS
    r->busy--;
    if (r->closing) {
        ring_release_view(r);
        return -1;
    }
    return 0;
}

/* getreadbuf() -> [Buffer]: every whole message ready, one buffer each, up to the limit; [] when
 * none (armed first when there is a fileno). The slow path for a flagged record, NoSpace, its
 * own readiness signal, and now and then a look at the peer. */
FR_HIDDEN PyObject *Ring_getreadbuf(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (nargs || kwnames || !lend_ok(self, 0) || self->signalled || self->lent >= self->lend_limit)
        return slow(self->slow_get, args, nargs, kwnames);
    if (self->armed && (disarm_and_drain(self) < 0 || !lend_ok(self, 0)))
        return slow(self->slow_get, args, nargs, kwnames);
    rec_t rec;
    int ok;
    while (!(ok = peek_plain(self, &rec))) {
        uint64_t now = now_ns();
        if (record_waiting(self) || self->pinned >= self->pin_limit || now >= self->next_look) {
            self->next_look = now + LOOK_NS;
            return slow(self->slow_get, args, nargs, kwnames);
        }
        if (!self->polled) return PyList_New(0);
        if (!arm_event(self)) {
            self->armed = 1;
            return PyList_New(0);
        }
    }
    if (ok < 0) return NULL;
    PyObject *out = PyList_New(0);
    uint64_t copied = 0;
    while (ok > 0) {
        PyObject *buf = out ? lend_record(self, &rec) : NULL;
        if (!buf) {
            if (!out) unpeek(self, &rec);
            break;
        }
        if (PyList_Append(out, buf) < 0) { /* (no memory) this record stays to be read again; the
                                              buffers in the list are handed over */
            Py_DECREF(buf);
            unpeek(self, &rec);
            break;
        }
        Py_DECREF(buf);
        if (!self->unsafe) (void)release_at(self, rec.pos); /* the record just peeked: cannot fail */
        self->lent++;
        if (self->unsafe) self->pinned += rec.length;
        self->msgs++;
        self->bytes += rec.length;
        copied += rec.length;
        ok = self->lent < self->lend_limit && (self->unsafe || !self->burst || copied < self->burst)
                 ? peek_plain(self, &rec)
                 : 0;
    }
    if (out && PyList_GET_SIZE(out)) {
        PyErr_Clear(); /* an error after the first: it comes again at the next call */
        return out;
    }
    Py_XDECREF(out);
    return NULL;
}

/* release(buf): a read buffer this side lent, alive. */
FR_HIDDEN PyObject *Ring_release_buf(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (nargs == 1 && !kwnames && self->writer == 0 && self->has_view && !self->closing && self->owner) {
        Buffer *b = (Buffer *)args[0];
        if (Py_IS_TYPE(b, &BufferType) && b->data && b->owner == self->owner && !b->writable) {
            unsigned long long pos = 0, length = 0;
            PyObject *tok = b->token;
            int pinned = PyTuple_CheckExact(tok) && PyTuple_GET_SIZE(tok) == 2;
            if (pinned) {
                pos = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(tok, 0));
                length = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(tok, 1));
                if (PyErr_Occurred()) { PyErr_Clear(); pinned = -1; }
            }
            if (pinned >= 0 && (pinned || tok == Py_None)) {
                PyObject *view = b->data;
                b->data = NULL;
                self->lent--;
                PyObject *copy = pinned || !PyMemoryView_Check(view) ? NULL
                                                                    : Py_XNewRef(PyMemoryView_GET_BASE(view));
                PyObject *res = PyObject_CallMethodNoArgs(view, str_release);
                Py_DECREF(view);
                if (res) Py_DECREF(res);
                else if (PyErr_ExceptionMatches(PyExc_BufferError)) PyErr_Clear(); /* views of the view */
                else {
                    Py_XDECREF(copy);
                    return NULL;
                }
                if (copy) {
                    keep_spare(self, copy);
                    Py_DECREF(copy);
                }
                if (pinned) {
                    self->pinned -= length;
                    if (release_at(self, pos) < 0) return NULL;
                }
                Py_RETURN_NONE;
            }
        }
    }
    return slow(self->slow_put, args, nargs, kwnames);
}

/* lend(owner, mem, get, put, limit=0, pin_limit=0, unsafe=False, bell=-1, burst=0): the buffer API's
 * slow paths (`get`: getwritebuf or getreadbuf, `put`: commit or release), the owner of the
 * buffers (the data path), the ring's memory as a memoryview the buffers slice (read-only on the
 * reader), and on the reader: at most `limit` read buffers lent, at most `pin_limit` ring bytes
 * under unsafe ones (`unsafe`: views, else copies), `bell`, the doorbell the peer rings when this
 * side armed readiness (drained after), and `burst`: a getreadbuf of copies stops once it has
 * copied that many bytes (0: no bound).
 * lend(None, None, get, put): no fast path any more; every call goes to `get`/`put` (None:
 * ConnectionClosed). */
FR_HIDDEN PyObject *Ring_lend(Ring *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"owner", "mem", "get", "put", "limit", "pin_limit", "unsafe", "bell", "burst", NULL};
    PyObject *owner, *mem, *get, *put;
    Py_ssize_t limit = 0;
    unsigned long long pin_limit = 0, burst = 0;
    int unsafe = 0, bell = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|nKpiK", kwlist, &owner, &mem, &get, &put, &limit, &pin_limit,
                                     &unsafe, &bell, &burst))
        return NULL;
    if ((get != Py_None && !PyCallable_Check(get)) || (put != Py_None && !PyCallable_Check(put))) {
        PyErr_SetString(PyExc_TypeError, "the slow paths must be callable or None");
        return NULL;
    }
    if (owner == Py_None) { /* the fast path ends; every call goes to get/put (None: closed) */
        Py_CLEAR(self->owner);
        Py_CLEAR(self->mem);
        Py_XSETREF(self->slow_get, get == Py_None ? NULL : Py_NewRef(get));
        Py_XSETREF(self->slow_put, put == Py_None ? NULL : Py_NewRef(put));
        Py_RETURN_NONE;
    }
    if (check_open(self) < 0) return NULL;
    Py_buffer *mb = PyMemoryView_Check(mem) ? PyMemoryView_GET_BUFFER(mem) : NULL;
    if (!mb || mb->len != self->view.len || mb->buf != self->view.buf || mb->itemsize != 1 || mb->ndim != 1 ||
        mb->readonly != !self->writer) {
        PyErr_SetString(PyExc_ValueError,
                        "mem must be a byte memoryview of the ring's own memory (read-only on the reader)");
        return NULL;
    }
    if (get == Py_None || put == Py_None) {
        PyErr_SetString(PyExc_TypeError, "lend(owner, ...) needs both slow paths");
        return NULL;
    }
    PyObject *epoch = PyLong_FromUnsignedLong(self->epoch);
    if (!epoch) return NULL;
    Py_XSETREF(self->epoch_obj, epoch);
    Py_XSETREF(self->owner, Py_NewRef(owner));
    Py_XSETREF(self->mem, Py_NewRef(mem));
    Py_XSETREF(self->slow_get, Py_NewRef(get));
    Py_XSETREF(self->slow_put, Py_NewRef(put));
    self->lend_limit = limit;
    self->pin_limit = pin_limit;
    self->unsafe = unsafe;
    self->burst = burst;
    self->bell_fd = bell;
    Py_RETURN_NONE;
}
