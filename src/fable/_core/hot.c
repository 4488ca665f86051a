/* The Connection's per-message calls on a ring (fable._core): send and send_many on the
 * writer, recv, recv_many and recv_into on the reader. The Connection binds them straight to its
 * instance, so one call is one C call. Each does the common case here, waiting in C without
 * the GIL when the ring is empty or full (hot_wait: slices, liveness, signals), and returns its
 * result from the same call. Everything else goes to the Python slow path installed by hot():
 * a message in several fragments, a flagged record (close, END of an epoch), the gate (a switch
 * or a failure in progress), a deadline that passed, news from the peer on the liveness fd, an
 * argument the fast path does not take. The slow path is always right; this is only faster. */
#include "core.h"

#include <string.h>

/* The calls of a side whose hot path may run now (re-checked after every wait). */
static int hot_ok(Ring *r, int writer) {
    return !r->gate && r->writer == writer && r->has_view && !r->closing && r->slow;
}

/* One message more through the hot path (the ring's msgs/nbytes counters). */
static void count(Ring *r, uint64_t length) {
    r->msgs++;
    r->bytes += length;
}

/* The timeout argument of a hot call: args[at], or the keyword "timeout". 1 with *until set (0:
 * wait forever) and *nowait (timeout 0); 0 when the call is not of the plain kind (another
 * keyword, a bad value, a negative one...): the slow path then takes it and says what is wrong. */
FR_HIDDEN int parse_timeout(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, Py_ssize_t at,
                            uint64_t *until, int *nowait) {
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *t = NULL;
    if (nargs < at || nargs + nkw > at + 1) return 0;
    if (nkw) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0) return 0;
        t = args[nargs];
    } else if (nargs == at + 1) {
        t = args[at];
    }
    *until = 0;
    *nowait = 0;
    if (!t || t == Py_None) return 1;
    double s = PyFloat_AsDouble(t);
    if (s == -1.0 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
    if (!(s >= 0) || s > 1e9) return 0; /* negative, NaN, or beyond what fits: the slow path */
    if (s == 0) { *nowait = 1; return 1; }
    *until = now_ns() + (uint64_t)(s * 1e9) + 1;
    return 1;
}

/* Call the slow path with the call's arguments; with a deadline (`until`), with what is left
 * of it instead (at least 1 ns: the slow path then reads what is there or raises Timeout). */
FR_HIDDEN PyObject *call_slow(PyObject *slow, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                              Py_ssize_t at, uint64_t until) {
    if (!slow) { PyErr_SetString(ConnectionClosed, "connection is closed"); return NULL; }
    if (!until) return PyObject_Vectorcall(slow, args, (size_t)nargs, kwnames);
    uint64_t t = now_ns();
    PyObject *left = PyFloat_FromDouble(t < until ? (double)(until - t) / 1e9 : 1e-9);
    if (!left) return NULL;
    PyObject *vec[4];
    for (Py_ssize_t i = 0; i < at && i < 3; i++) vec[i] = args[i];
    vec[at] = left;
    PyObject *res = PyObject_Vectorcall(slow, vec, (size_t)(at + 1), NULL);
    Py_DECREF(left);
    return res;
}

/* After peek_plain found nothing plain: whether a record is there all the same (flagged), for
 * the slow path; waiting would not change that. */
FR_HIDDEN int record_waiting(Ring *r) { return r->tail_cache > r->pos; }

/* The room a full writer waits for: the message twice over or a quarter of the ring, so that
 * a reader catching up wakes it once, not once per record. */
FR_HIDDEN uint64_t room_for(Ring *r, uint64_t len) {
    uint64_t need = 2 * fr_span(len, 0), quarter = r->cap / 4;
    return need > quarter ? need : quarter;
}

/* send(data, timeout=None): a whole message in one record, waiting for room. */
FR_HIDDEN PyObject *Ring_send(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    uint64_t until = 0;
    int nowait = 0;
    Py_buffer b;
    if (nargs >= 1 && hot_ok(self, 1) && parse_timeout(args, nargs, kwnames, 1, &until, &nowait)) {
        if (PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0) {
            PyErr_Clear(); /* not a simple buffer: the slow path says what is wrong */
        } else {
            while ((uint64_t)b.len <= self->frag && hot_ok(self, 1)) {
                int ok = append_record(self, b.buf, (uint64_t)b.len, 0);
                if (ok > 0) {
                    count(self, (uint64_t)b.len);
                    do_publish(self);
                    PyBuffer_Release(&b);
                    Py_RETURN_NONE;
                }
                if (ok < 0) { PyBuffer_Release(&b); return NULL; }
                if (nowait || self->wmode < 0) break;
                ok = hot_wait(self, room_for(self, (uint64_t)b.len), until);
                if (ok < 0) { PyBuffer_Release(&b); return NULL; }
                if (!ok) break;
            }
            PyBuffer_Release(&b);
        }
    }
    return call_slow(self->slow, args, nargs, kwnames, 1, until);
}

/* send_many(msgs, timeout=None) -> int: one record each, one TAIL store per batch that fits,
 * waiting for room in between; the rest (a message larger than one record, the deadline) goes
 * to the slow path, whose count is added. */
FR_HIDDEN PyObject *Ring_send_many(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    uint64_t until = 0;
    int nowait = 0;
    if (nargs < 1 || !hot_ok(self, 1) || !parse_timeout(args, nargs, kwnames, 1, &until, &nowait))
        return call_slow(self->slow_many, args, nargs, kwnames, 1, 0);
    PyObject *fast = PySequence_Fast(args[0], "send_many takes an iterable of bytes-like objects");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), done = 0;
    PyObject **items = PySequence_Fast_ITEMS(fast);
    while (done < n && hot_ok(self, 1)) {
        Py_ssize_t k = done;
        uint64_t next_len = 0;
        int big = 0; /* items[k] is for the slow path: larger than one record, or not a buffer */
        for (; k < n; k++) {
            Py_buffer b;
            if (PyObject_GetBuffer(items[k], &b, PyBUF_SIMPLE) < 0) { PyErr_Clear(); big = 1; break; }
            next_len = (uint64_t)b.len;
            if (next_len > self->frag) { PyBuffer_Release(&b); big = 1; break; }
            int ok = append_record(self, b.buf, next_len, 0);
            if (ok > 0) count(self, next_len);
            PyBuffer_Release(&b);
            if (ok < 0) { do_publish(self); Py_DECREF(fast); return NULL; }
            if (!ok) break;
        }
        do_publish(self);
        done = k;
        if (done == n || big) break;
        if (nowait || self->wmode < 0) break;
        int w = hot_wait(self, room_for(self, next_len), until);
        if (w < 0) { Py_DECREF(fast); return NULL; }
        if (!w) break;
    }
    if (done == n) { Py_DECREF(fast); return PyLong_FromSsize_t(done); }
    /* the rest, as the slow path's (with what is left of the deadline) */
    PyObject *rest = PySequence_GetSlice(fast, done, n);
    Py_DECREF(fast);
    if (!rest) return NULL;
    PyObject *vec[2] = {rest, nargs > 1 ? args[1] : kwnames ? args[nargs] : Py_None};
    PyObject *more = call_slow(self->slow_many, vec, 2, NULL, 1, until);
    Py_DECREF(rest);
    if (!more) return NULL;
    Py_ssize_t extra = PyLong_AsSsize_t(more);
    Py_DECREF(more);
    if (extra == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromSsize_t(done + extra);
}

/* The next whole message's record, waiting for it (hot_wait) unless `nowait`: 1 (handed out,
 * *rec filled), 0 (the slow path decides: nothing there and no wait allowed, a flagged
 * record, or the wait ended for the slow path), -1 (error). */
static int next_plain(Ring *r, rec_t *rec, uint64_t until, int nowait) {
    do {
        int ok = peek_plain(r, rec);
        if (ok) return ok;
        if (nowait || r->wmode < 0 || record_waiting(r)) return 0;
        ok = hot_wait(r, 0, until);
        if (ok <= 0) return ok;
    } while (hot_ok(r, 0));
    return 0;
}

/* recv(timeout=None) -> bytes: the next whole message, waiting for it. */
FR_HIDDEN PyObject *Ring_recv(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    uint64_t until = 0;
    int nowait = 0;
    rec_t rec;
    if (hot_ok(self, 0) && parse_timeout(args, nargs, kwnames, 0, &until, &nowait)) {
        int ok = next_plain(self, &rec, until, nowait);
        if (ok < 0) return NULL;
        if (ok) {
            PyObject *m = take_bytes(self, &rec);
            if (m) count(self, rec.length);
            return m;
        }
    }
    return call_slow(self->slow, args, nargs, kwnames, 0, until);
}

/* recv_many(max_msgs, timeout=None) -> list[bytes]: the next whole message (waiting for it),
 * then every whole message ready, at most max_msgs. A record is released only once its copy
 * is in the list: an error after the first hands over the list, and comes again at the next
 * call (the ring's state), or the record it left is read then (no memory). */
FR_HIDDEN PyObject *Ring_recv_many(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    uint64_t until = 0;
    int nowait = 0;
    rec_t rec;
    Py_ssize_t max = nargs >= 1 && PyLong_CheckExact(args[0]) ? PyLong_AsSsize_t(args[0]) : -1;
    if (max == -1 && PyErr_Occurred()) PyErr_Clear();
    if (max >= 1 && hot_ok(self, 0) && parse_timeout(args, nargs, kwnames, 1, &until, &nowait)) {
        int ok = next_plain(self, &rec, until, nowait);
        if (ok < 0) return NULL;
        if (ok) {
            PyObject *out = PyList_New(0);
            while (ok > 0) {
                PyObject *m = out ? copy_out(self, &rec) : NULL;
                if (!m || PyList_Append(out, m) < 0) {
                    Py_XDECREF(m);
                    unpeek(self, &rec);
                    break;
                }
                Py_DECREF(m);
                (void)release_at(self, rec.pos); /* the record just peeked: held, cannot fail */
                count(self, rec.length);
                ok = PyList_GET_SIZE(out) < max ? peek_plain(self, &rec) : 0;
            }
            if (out && PyList_GET_SIZE(out)) {
                PyErr_Clear();
                return out;
            }
            Py_XDECREF(out);
            return NULL;
        }
    }
    return call_slow(self->slow_many, args, nargs, kwnames, 1, until);
}

/* recv_into(buf, timeout=None) -> int: the next whole message copied into buf, waiting for it;
 * one that does not fit stays in the ring (the slow path raises ValueError). */
FR_HIDDEN PyObject *Ring_recv_into(Ring *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    uint64_t until = 0;
    int nowait = 0;
    rec_t rec;
    Py_buffer b;
    if (nargs >= 1 && hot_ok(self, 0) && parse_timeout(args, nargs, kwnames, 1, &until, &nowait)) {
        if (PyObject_GetBuffer(args[0], &b, PyBUF_WRITABLE) < 0) {
            PyErr_Clear(); /* not a writable buffer: the slow path says what is wrong */
        } else {
            int ok = next_plain(self, &rec, until, nowait);
            if (ok > 0 && rec.length > (uint64_t)b.len) {
                unpeek(self, &rec);
                ok = 0;
            }
            if (ok > 0) memcpy(b.buf, (const uint8_t *)self->view.buf + rec.offset, (size_t)rec.length);
            PyBuffer_Release(&b);
            if (ok < 0) return NULL;
            if (ok) {
                (void)release_at(self, rec.pos); /* held: cannot fail */
                count(self, rec.length);
                return PyLong_FromUnsignedLongLong(rec.length);
            }
        }
    }
    return call_slow(self->slow_into, args, nargs, kwnames, 1, until);
}

/* hot(slow, frag=0, many=None, into=None): install the slow paths (None: remove them, which
 * breaks the reference cycle through the path): `slow` for send/recv, `many` for
 * send_many/recv_many, `into` for recv_into. `frag`: the largest message send() writes as one
 * record. */
FR_HIDDEN PyObject *Ring_hot(Ring *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"slow", "frag", "many", "into", NULL};
    PyObject *slow, *many = Py_None, *into = Py_None;
    unsigned long long frag = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|KOO", kwlist, &slow, &frag, &many, &into)) return NULL;
    PyObject *fns[3] = {slow, many, into};
    for (int i = 0; i < 3; i++) {
        if (fns[i] != Py_None && !PyCallable_Check(fns[i])) {
            PyErr_SetString(PyExc_TypeError, "the slow paths must be callable");
            return NULL;
        }
    }
    Py_XSETREF(self->slow, slow == Py_None ? NULL : Py_NewRef(slow));
    Py_XSETREF(self->slow_many, many == Py_None ? NULL : Py_NewRef(many));
    Py_XSETREF(self->slow_into, into == Py_None ? NULL : Py_NewRef(into));
    if (frag > self->max_record) frag = self->max_record;
    self->frag = frag;
    Py_RETURN_NONE;
}

/* waits(mode, slice_ns, spin_ns, live_fd=-1, cpu_hint=None): how the hot path waits (mode: an
 * fr_wait_mode; -1: it does not wait, the slow path does). live_fd: polled at each slice's end
 * (the setup channel). cpu_hint: a writable 4-byte buffer (this side's CPU field in the other
 * ring of the pair, where the peer looks for it), noted before each wait. */
FR_HIDDEN PyObject *Ring_waits(Ring *self, PyObject *args) {
    int mode, live_fd = -1;
    unsigned long long slice_ns, spin_ns;
    PyObject *hint = Py_None;
    if (check_open(self) < 0 || !PyArg_ParseTuple(args, "iKK|iO", &mode, &slice_ns, &spin_ns, &live_fd, &hint)) return NULL;
    if (mode < -1 || mode > FR_MODE_ADAPTIVE) { PyErr_SetString(PyExc_ValueError, "mode must be -1, 0 (spin), 1 (futex) or 2 (adaptive)"); return NULL; }
    if (mode >= 0 && (slice_ns < 1000 || slice_ns > 3600000000000ULL)) { PyErr_SetString(PyExc_ValueError, "slice_ns must be in 1 us..1 h"); return NULL; }
    if (self->has_hint) {
        PyBuffer_Release(&self->hint_view);
        self->has_hint = 0;
        self->cpu_hint = NULL;
    }
    if (hint != Py_None) {
        if (PyObject_GetBuffer(hint, &self->hint_view, PyBUF_WRITABLE) < 0) return NULL;
        if (self->hint_view.len != 4 || (uintptr_t)self->hint_view.buf % 4) {
            PyBuffer_Release(&self->hint_view);
            PyErr_SetString(PyExc_ValueError, "cpu_hint must be a 4-byte aligned writable buffer");
            return NULL;
        }
        self->has_hint = 1;
        self->cpu_hint = self->hint_view.buf;
    }
    self->wmode = mode;
    self->slice_ns = slice_ns;
    self->spin_ns = spin_ns;
    self->live_fd = live_fd;
    Py_RETURN_NONE;
}
