/* fable._core: the C fast path of the shared-memory ring (layout: ring.h; the parts and their
 * jobs: core.h). This file: the Ring type and its lifecycle, the module, and vmsplice(), which
 * Python's os module lacks (the vmsplice-coop transport). Policy (which wait, timeouts, what to
 * do when the peer is gone) stays in Python; C does the per-message work and the waiting. */
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/uio.h>

FR_HIDDEN PyObject *ProtocolError;
FR_HIDDEN PyObject *ConnectionClosed;

FR_HIDDEN PyObject *proto_error(const char *fmt, ...) {
    va_list va;
    va_start(va, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, va);
    va_end(va);
    if (msg) { PyErr_SetObject(ProtocolError, msg); Py_DECREF(msg); }
    return NULL;
}

FR_HIDDEN int check_open(Ring *r) {
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
    self->wmode = -1; /* until waits(): the hot path does not wait */
    self->live_fd = -1;
    self->bell_fd = -1;
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

FR_HIDDEN void ring_release_view(Ring *self) {
    if (self->busy) return; /* a wait without the GIL still reads the memory: at its end */
    if (self->has_view) {
        PyBuffer_Release(&self->view);
        self->has_view = 0;
    }
    if (self->has_hint) {
        PyBuffer_Release(&self->hint_view);
        self->has_hint = 0;
        self->cpu_hint = NULL;
    }
}

static PyObject *Ring_close(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (self->has_view && !self->closing) {
        /* SYNC POINT: a release store of the stop flag, as interrupt(True) does; the wake that
         * follows ends a hot-path wait of another thread, which holds no lock of the path. */
        __atomic_store_n(&self->stop, 1, __ATOMIC_RELEASE);
        wake_own(self);
    }
    self->closing = 1;
    ring_release_view(self); /* deferred to the end of a wait in progress */
    Py_RETURN_NONE;
}

/* The Python objects a ring holds: the slow paths are bound methods of the data path that holds
 * the ring (a cycle, which the path breaks when it frees the ring, and the collector if not). */
static int Ring_traverse(Ring *self, visitproc visit, void *arg) {
    Py_VISIT(self->slow);
    Py_VISIT(self->slow_many);
    Py_VISIT(self->slow_into);
    Py_VISIT(self->owner);
    Py_VISIT(self->mem);
    Py_VISIT(self->slow_get);
    Py_VISIT(self->slow_put);
    Py_VISIT(self->epoch_obj); /* (not the spare: bytes hold no references, and nobody may see it) */
    return 0;
}

static int Ring_clear(Ring *self) {
    Py_CLEAR(self->slow);
    Py_CLEAR(self->slow_many);
    Py_CLEAR(self->slow_into);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->mem);
    Py_CLEAR(self->slow_get);
    Py_CLEAR(self->slow_put);
    Py_CLEAR(self->epoch_obj);
    Py_CLEAR(self->spare);
    return 0;
}

static void Ring_dealloc(Ring *self) {
    PyObject_GC_UnTrack(self);
    Ring_clear(self);
    self->busy = 0;
    ring_release_view(self);
    PyMem_Free(self->slots);
    PyMem_Free(self->held);
    Py_TYPE(self)->tp_free((PyObject *)self);
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
static PyObject *Ring_get_busy(Ring *self, void *c) { return PyLong_FromLong(self->busy); }
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

/* The buffer API's counters, which the Python slow path keeps too (lend.c). */
static PyObject *get_ssize(Py_ssize_t *v) { return PyLong_FromSsize_t(*v); }
static int set_ssize(Py_ssize_t *v, PyObject *o) {
    Py_ssize_t n = o ? PyLong_AsSsize_t(o) : -1;
    if (n == -1 && (!o || PyErr_Occurred())) {
        if (!o) PyErr_SetString(PyExc_TypeError, "cannot delete a counter");
        return -1;
    }
    *v = n;
    return 0;
}
static PyObject *Ring_get_lent(Ring *self, void *c) { return get_ssize(&self->lent); }
static int Ring_set_lent(Ring *self, PyObject *v, void *c) { return set_ssize(&self->lent, v); }
static PyObject *Ring_get_open_parts(Ring *self, void *c) { return get_ssize(&self->open_parts); }
static int Ring_set_open_parts(Ring *self, PyObject *v, void *c) { return set_ssize(&self->open_parts, v); }
static PyObject *Ring_get_pinned(Ring *self, void *c) { return PyLong_FromUnsignedLongLong(self->pinned); }
static int Ring_set_pinned(Ring *self, PyObject *v, void *c) {
    unsigned long long n = v ? PyLong_AsUnsignedLongLong(v) : 0;
    if (!v) PyErr_SetString(PyExc_TypeError, "cannot delete a counter");
    if (!v || PyErr_Occurred()) return -1;
    self->pinned = n;
    return 0;
}
static int set_flag(int *f, PyObject *v) {
    int t = v ? PyObject_IsTrue(v) : 0;
    if (t < 0) return -1;
    *f = t;
    return 0;
}
static PyObject *Ring_get_polled(Ring *self, void *c) { return PyBool_FromLong(self->polled); }
static int Ring_set_polled(Ring *self, PyObject *v, void *c) { return set_flag(&self->polled, v); }
static PyObject *Ring_get_armed(Ring *self, void *c) { return PyBool_FromLong(self->armed); }
static int Ring_set_armed(Ring *self, PyObject *v, void *c) { return set_flag(&self->armed, v); }
static PyObject *Ring_get_signalled(Ring *self, void *c) { return PyBool_FromLong(self->signalled); }
static int Ring_set_signalled(Ring *self, PyObject *v, void *c) { return set_flag(&self->signalled, v); }

static PyGetSetDef Ring_getset[] = {
    {"lent", (getter)Ring_get_lent, (setter)Ring_set_lent, "read buffers lent and not yet released", NULL},
    {"pinned", (getter)Ring_get_pinned, (setter)Ring_set_pinned, "ring bytes under unsafe read buffers", NULL},
    {"open_parts", (getter)Ring_get_open_parts, (setter)Ring_set_open_parts, "records reserved by getwritebuf, not yet committed or aborted", NULL},
    {"polled", (getter)Ring_get_polled, (setter)Ring_set_polled, "a readiness fd exists: an empty getreadbuf arms it", NULL},
    {"armed", (getter)Ring_get_armed, (setter)Ring_set_armed, "readiness is armed: the next getreadbuf consumes it", NULL},
    {"signalled", (getter)Ring_get_signalled, (setter)Ring_set_signalled, "Python signalled its own readiness fd: getreadbuf is the slow path's", NULL},
    {"seq", (getter)Ring_get_seq, NULL, "next sequence number", NULL},
    {"epoch", (getter)Ring_get_epoch, NULL, "epoch written into / expected in records", NULL},
    {"capacity", (getter)Ring_get_capacity, NULL, "data area size", NULL},
    {"max_record", (getter)Ring_get_max_record, NULL, "largest record payload (writer)", NULL},
    {"pending", (getter)Ring_get_pending, NULL, "reserved records not yet published (writer)", NULL},
    {"held", (getter)Ring_get_held, NULL, "records handed out, not released (reader)", NULL},
    {"msgs", (getter)Ring_get_msgs, NULL, "messages the hot path moved", NULL},
    {"nbytes", (getter)Ring_get_bytes, NULL, "bytes the hot path moved", NULL},
    {"gate", (getter)Ring_get_gate, (setter)Ring_set_gate, "True: send/recv take the slow path", NULL},
    {"busy", (getter)Ring_get_busy, NULL, "waits in progress without the GIL (another thread's)", NULL},
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
    {"available", (PyCFunction)Ring_available, METH_NOARGS, "available() -> bool"},
    {"wait", (PyCFunction)Ring_wait, METH_VARARGS, "wait(need, mode, slice_ns, spin_ns) -> bool"},
    {"arm", (PyCFunction)Ring_arm, METH_NOARGS, "arm() -> bool (True: data already there)"},
    {"disarm", (PyCFunction)Ring_disarm, METH_NOARGS, "disarm(): clear the event bit"},
    {"note_cpu", (PyCFunction)Ring_note_cpu, METH_NOARGS, "note_cpu() -> this thread's CPU, published in the ring"},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "close(): let go of the memory"},
    {"interrupt", (PyCFunction)Ring_interrupt, METH_O, "interrupt(on): waits return at once while on"},
    {"send", (PyCFunction)(void (*)(void))Ring_send, METH_FASTCALL | METH_KEYWORDS, "send(data, timeout=None): the Connection's send"},
    {"send_many", (PyCFunction)(void (*)(void))Ring_send_many, METH_FASTCALL | METH_KEYWORDS, "send_many(msgs, timeout=None) -> int: the Connection's send_many"},
    {"recv", (PyCFunction)(void (*)(void))Ring_recv, METH_FASTCALL | METH_KEYWORDS, "recv(timeout=None): the Connection's recv"},
    {"recv_many", (PyCFunction)(void (*)(void))Ring_recv_many, METH_FASTCALL | METH_KEYWORDS, "recv_many(max_msgs, timeout=None) -> list: the Connection's recv_many"},
    {"recv_into", (PyCFunction)(void (*)(void))Ring_recv_into, METH_FASTCALL | METH_KEYWORDS, "recv_into(buf, timeout=None) -> int: the Connection's recv_into"},
    {"hot", (PyCFunction)(void (*)(void))Ring_hot, METH_VARARGS | METH_KEYWORDS, "hot(slow, frag=0, many=None, into=None): install the slow paths"},
    {"getwritebuf", (PyCFunction)(void (*)(void))Ring_getwritebuf, METH_FASTCALL | METH_KEYWORDS, "getwritebuf(size, timeout=None) -> [Buffer]: the Connection's getwritebuf"},
    {"commit_bufs", (PyCFunction)(void (*)(void))Ring_commit_bufs, METH_FASTCALL | METH_KEYWORDS, "commit_bufs(bufs, nbytes, *, flush=True, more=False): the Connection's commit"},
    {"getreadbuf", (PyCFunction)(void (*)(void))Ring_getreadbuf, METH_FASTCALL | METH_KEYWORDS, "getreadbuf() -> [Buffer]: the Connection's getreadbuf"},
    {"release_buf", (PyCFunction)(void (*)(void))Ring_release_buf, METH_FASTCALL | METH_KEYWORDS, "release_buf(buf): the Connection's release"},
    {"lend", (PyCFunction)(void (*)(void))Ring_lend, METH_VARARGS | METH_KEYWORDS, "lend(owner, mem, get, put, limit=0, pin_limit=0, unsafe=False): install the buffer API's slow paths"},
    {"waits", (PyCFunction)Ring_waits, METH_VARARGS, "waits(mode, slice_ns, spin_ns, live_fd=-1, cpu_hint=None): how the hot path waits"},
    {NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fable._core.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Ring_traverse,
    .tp_clear = (inquiry)Ring_clear,
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
    DeadBuffer = PyObject_GetAttrString(errors, "DeadBuffer");
    Py_DECREF(errors);
    if (!ProtocolError || !ConnectionClosed || !DeadBuffer) return NULL;
    if (PyType_Ready(&RingType) < 0 || lend_init() < 0) return NULL;
    PyObject *m = PyModule_Create(&coremodule);
    if (!m) return NULL;
    Py_INCREF(&RingType);
    PyModule_AddObject(m, "Ring", (PyObject *)&RingType);
    Py_INCREF(&BufferType);
    PyModule_AddObject(m, "Buffer", (PyObject *)&BufferType);
    PyObject *layout = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}",
        "MAGIC_OFF", FR_MAGIC_OFF, "VERSION_OFF", FR_VERSION_OFF, "HEADER_SIZE_OFF", FR_HEADER_SIZE_OFF,
        "CAPACITY", FR_CAPACITY, "TAIL", FR_TAIL, "WRITER_CPU", FR_WRITER_CPU,
        "SPACE_WAITING", FR_SPACE_WAITING, "DATA_BELL", FR_DATA_BELL, "SPACE_WANTED", FR_SPACE_WANTED, "HEAD", FR_HEAD,
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
