/* fable.bench._native: the bench's C helpers, kept out of the transports' fast path (_core).
 *
 * message(seq, size) -> bytes      a new bench message: every byte written, every byte a
 *                                   function of (seq, offset)
 * fill(buf, seq)                    the same bytes into a writable buffer
 * check(buf, seq) -> int            -1 if buf holds message `seq` of len(buf) bytes, else the
 *                                   offset of the first wrong byte
 * messages(first, n, size) -> list  messages first..first+n-1 (a batch for send_many)
 * check_many(msgs, first, size, full) -> int
 *                                   -1 if msgs are messages first, first+1... of `size` bytes
 *                                   (full: every byte checked, else the sequence numbers), else
 *                                   the index of the first wrong one
 * floor(mem, role, base, n, stamps, timeout_ns) -> bool
 *                                   the cache-line ping-pong of the `floor` row (see below)
 *
 * Message layout (the harness and docs/bench.md describe the same):
 *
 *   offset 0        8               16              ...             size
 *          +--------+---------------+---------------+------- ~ ------+
 *          | seq LE | word(seq, 1)  | word(seq, 2)  |  ...  (cut)    |
 *          +--------+---------------+---------------+------- ~ ------+
 *
 * A message shorter than 8 bytes holds the low bytes of seq. word(seq, w) mixes seq and the word
 * index, so a byte left over from an earlier message, or moved within a message, is caught by a
 * full check, and not only a wrong sequence number. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

static inline uint64_t word_of(uint64_t seq, uint64_t w) {
    uint64_t x = seq * 0x9E3779B97F4A7C15ull + w * 0xD1B54A32D192ED03ull;
    x ^= x >> 29;
    return x;
}

static void do_fill(unsigned char *p, size_t size, uint64_t seq) {
    uint64_t v = seq;
    if (size < 8) {
        memcpy(p, &v, size); /* little-endian machines only: x86-64, aarch64 */
        return;
    }
    memcpy(p, &v, 8);
    size_t w = 1;
    for (; 8 * w + 8 <= size; w++) {
        v = word_of(seq, w);
        memcpy(p + 8 * w, &v, 8);
    }
    if (8 * w < size) {
        v = word_of(seq, w);
        memcpy(p + 8 * w, &v, size - 8 * w);
    }
}

static Py_ssize_t do_check(const unsigned char *p, size_t size, uint64_t seq) {
    unsigned char want[8];
    uint64_t v = seq;
    if (size < 8) {
        memcpy(want, &v, size);
        for (size_t i = 0; i < size; i++)
            if (p[i] != want[i]) return (Py_ssize_t)i;
        return -1;
    }
    for (size_t w = 0; 8 * w < size; w++) {
        v = w == 0 ? seq : word_of(seq, w);
        size_t n = size - 8 * w < 8 ? size - 8 * w : 8;
        if (memcmp(p + 8 * w, &v, n) != 0) {
            memcpy(want, &v, 8);
            for (size_t i = 0; i < n; i++)
                if (p[8 * w + i] != want[i]) return (Py_ssize_t)(8 * w + i);
        }
    }
    return -1;
}

static PyObject *native_message(PyObject *Py_UNUSED(m), PyObject *args) {
    unsigned long long seq;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "Kn:message", &seq, &size)) return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must be >= 0");
        return NULL;
    }
    PyObject *b = PyBytes_FromStringAndSize(NULL, size);
    if (!b) return NULL;
    do_fill((unsigned char *)PyBytes_AS_STRING(b), (size_t)size, seq);
    return b;
}

static PyObject *native_fill(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer view;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "w*K:fill", &view, &seq)) return NULL;
    do_fill(view.buf, (size_t)view.len, seq);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *native_check(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer view;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "y*K:check", &view, &seq)) return NULL;
    Py_ssize_t bad = do_check(view.buf, (size_t)view.len, seq);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(bad);
}

static PyObject *native_messages(PyObject *Py_UNUSED(m), PyObject *args) {
    unsigned long long first;
    Py_ssize_t n, size;
    if (!PyArg_ParseTuple(args, "Knn:messages", &first, &n, &size)) return NULL;
    if (size < 0 || n < 0) {
        PyErr_SetString(PyExc_ValueError, "n and size must be >= 0");
        return NULL;
    }
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, size);
        if (!b) {
            Py_DECREF(out);
            return NULL;
        }
        do_fill((unsigned char *)PyBytes_AS_STRING(b), (size_t)size, first + (uint64_t)i);
        PyList_SET_ITEM(out, i, b);
    }
    return out;
}

static PyObject *native_check_many(PyObject *Py_UNUSED(m), PyObject *args) {
    PyObject *seq;
    unsigned long long first;
    Py_ssize_t size;
    int full;
    if (!PyArg_ParseTuple(args, "OKnp:check_many", &seq, &first, &size, &full)) return NULL;
    PyObject *fast = PySequence_Fast(seq, "check_many takes a sequence of bytes-like objects");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), bad = -1;
    uint64_t mask = size >= 8 ? ~0ull : (1ull << (8 * size)) - 1;
    for (Py_ssize_t i = 0; i < n && bad < 0; i++) {
        Py_buffer v;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &v, PyBUF_SIMPLE) < 0) {
            Py_DECREF(fast);
            return NULL;
        }
        uint64_t want = first + (uint64_t)i, got = 0;
        if (v.len != size) {
            bad = i;
        } else if (full) {
            if (do_check(v.buf, (size_t)size, want) >= 0) bad = i;
        } else {
            memcpy(&got, v.buf, size < 8 ? (size_t)size : 8);
            if (got != (want & mask)) bad = i;
        }
        PyBuffer_Release(&v);
    }
    Py_DECREF(fast);
    return PyLong_FromSsize_t(bad);
}

/* ------------------------------------------------------------------------------------- floor
 * floor(mem, role, base, n, stamps, timeout_ns): the lower bound of a round trip between two
 * CPUs. `mem` is shared memory (MAP_SHARED, at least 64 bytes, 8-aligned); its first word is the
 * ball, which holds `base` when both sides start (0, then 2n more after each call).
 * Role 0 (the pinger) stores base+2i-1 and waits for base+2i, for i = 1..n, and writes
 * CLOCK_MONOTONIC after each round trip into stamps[i] (stamps[0] is the start; `stamps` is a
 * writable buffer of n+1 int64, or None). Role 1 (the ponger) waits for base+2i-1 and stores
 * base+2i. A waiting side spins on the cache line, and calls sched_yield() after a short spin so
 * that two ends sharing one CPU still make progress. Returns False if the peer did not answer
 * within timeout_ns, True when all n round trips are done. The GIL is released. */
static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int await_ball(volatile uint64_t *ball, uint64_t want, uint64_t timeout_ns) {
    uint64_t deadline = 0;
    for (unsigned spins = 0;; spins++) {
        if (__atomic_load_n(ball, __ATOMIC_ACQUIRE) == want) return 1;
        if (spins < 256) {
            cpu_relax();
            continue;
        }
        if (deadline == 0) deadline = mono_ns() + timeout_ns; /* off the fast path */
        sched_yield();
        if ((spins & 63) == 0 && mono_ns() > deadline) return 0;
    }
}

static PyObject *native_floor(PyObject *Py_UNUSED(m), PyObject *args) {
    Py_buffer mem, st = {0};
    int role;
    Py_ssize_t n;
    unsigned long long base, timeout_ns;
    PyObject *stamps;
    if (!PyArg_ParseTuple(args, "w*iKnOK:floor", &mem, &role, &base, &n, &stamps, &timeout_ns))
        return NULL;
    PyObject *result = NULL;
    int have_stamps = stamps != Py_None;
    if (have_stamps && PyObject_GetBuffer(stamps, &st, PyBUF_WRITABLE) < 0) goto out;
    if (mem.len < 64 || ((uintptr_t)mem.buf & 7) != 0) {
        PyErr_SetString(PyExc_ValueError, "floor needs at least 64 bytes of 8-aligned memory");
        goto out;
    }
    if (role != 0 && role != 1) {
        PyErr_SetString(PyExc_ValueError, "role is 0 (pinger) or 1 (ponger)");
        goto out;
    }
    if (n < 0 || (have_stamps && st.len < (n + 1) * (Py_ssize_t)sizeof(int64_t))) {
        PyErr_SetString(PyExc_ValueError, "stamps must hold n+1 int64 values");
        goto out;
    }
    volatile uint64_t *ball = mem.buf;
    int64_t *t = have_stamps ? st.buf : NULL;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    if (t) t[0] = (int64_t)mono_ns();
    for (Py_ssize_t i = 1; i <= n && ok; i++) {
        if (role == 0) {
            __atomic_store_n(ball, base + 2 * (uint64_t)i - 1, __ATOMIC_RELEASE);
            ok = await_ball(ball, base + 2 * (uint64_t)i, timeout_ns);
            if (t) t[i] = (int64_t)mono_ns();
        } else {
            ok = await_ball(ball, base + 2 * (uint64_t)i - 1, timeout_ns);
            if (ok) __atomic_store_n(ball, base + 2 * (uint64_t)i, __ATOMIC_RELEASE);
        }
    }
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(ok);
out:
    PyBuffer_Release(&mem);
    if (have_stamps && st.obj) PyBuffer_Release(&st);
    return result;
}

static PyMethodDef native_methods[] = {
    {"message", native_message, METH_VARARGS, "message(seq, size) -> bytes of bench message seq"},
    {"fill", native_fill, METH_VARARGS, "fill(buf, seq): write bench message seq into buf"},
    {"check", native_check, METH_VARARGS, "check(buf, seq) -> -1 or the first wrong offset"},
    {"messages", native_messages, METH_VARARGS, "messages(first, n, size) -> list of bench messages"},
    {"check_many", native_check_many, METH_VARARGS,
     "check_many(msgs, first, size, full) -> -1 or the index of the first wrong message"},
    {"floor", native_floor, METH_VARARGS,
     "floor(mem, role, base, n, stamps, timeout_ns) -> False if the peer stopped answering"},
    {NULL},
};

static struct PyModuleDef nativemodule = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fable.bench._native",
    .m_doc = "the bench's C helpers: message patterns, full checks, the floor ping-pong",
    .m_size = -1,
    .m_methods = native_methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&nativemodule); }
