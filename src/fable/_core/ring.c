/* The ring protocol of fable._core (layout: ring.h): a writer claims, copies and publishes
 * records (batched publish, doorbell); a reader peeks with a sequence check, copies out and
 * releases in any order (doorbell). The protocol is the one of src/fable/ring/pyring.py, the
 * executable reference; tests check that both behave alike. */
#include "core.h"

#include <string.h>

/* ------------------------------------------------------------------------------ writer */
FR_HIDDEN int writer_only(Ring *r) {
    if (check_open(r) < 0) return -1;
    if (!r->writer) { PyErr_SetString(PyExc_TypeError, "this Ring is the reading side"); return -1; }
    return 0;
}

FR_HIDDEN int reader_only(Ring *r) {
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
FR_HIDDEN int reserve_record(Ring *r, uint64_t length, uint64_t *pos, uint64_t *offset) {
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
FR_HIDDEN long do_publish(Ring *r) {
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
        ring_bell(&r->h->data_waiting, &r->h->data_bell, r->evfd, NULL, 0);
    }
    return n;
}

/* Reserve, copy and commit one record (published by the caller): 1 done, 0 no room, -1 error. */
FR_HIDDEN int append_record(Ring *r, const void *data, uint64_t len, uint32_t flags) {
    uint64_t pos, offset;
    int ok = reserve_record(r, len, &pos, &offset);
    if (ok <= 0) return ok;
    memcpy((uint8_t *)r->view.buf + offset, data, (size_t)len);
    slot_t *s = &r->slots[r->slot0 + r->nslots - 1];
    s->length = (int64_t)len; s->flags = flags; s->state = SLOT_COMMITTED;
    return 1;
}

FR_HIDDEN PyObject *Ring_reserve(Ring *self, PyObject *arg) {
    if (writer_only(self) < 0) return NULL;
    long long length = PyLong_AsLongLong(arg);
    if (length == -1 && PyErr_Occurred()) return NULL;
    if (length < 0) { PyErr_SetString(PyExc_ValueError, "record length must be >= 0"); return NULL; }
    uint64_t pos, offset;
    int ok = reserve_record(self, (uint64_t)length, &pos, &offset);
    if (ok < 0) return NULL;
    if (!ok) Py_RETURN_NONE;
    return Py_BuildValue("KKL", (unsigned long long)pos, (unsigned long long)offset, length);
}

/* Commit the reserved record at `pos` with `length` bytes of its room and `flags`. */
FR_HIDDEN int commit_record(Ring *r, uint64_t pos, uint64_t length, uint32_t flags) {
    slot_t *s = find_slot(r, pos);
    if (!s) return -1;
    if (length > s->room) {
        PyErr_Format(PyExc_ValueError, "length must be in 0..%llu", (unsigned long long)s->room);
        return -1;
    }
    s->length = (int64_t)length; s->flags = flags; s->state = SLOT_COMMITTED;
    return 0;
}

/* The reserved record at `pos` becomes padding. */
FR_HIDDEN int abort_record(Ring *r, uint64_t pos) {
    slot_t *s = find_slot(r, pos);
    if (!s) return -1;
    s->state = SLOT_PADDING;
    s->length = (int64_t)fr_span(s->room, 0);
    return 0;
}

FR_HIDDEN PyObject *Ring_commit(Ring *self, PyObject *args) {
    unsigned long long pos; long long length; unsigned int flags = 0;
    if (writer_only(self) < 0 || !PyArg_ParseTuple(args, "KL|I", &pos, &length, &flags)) return NULL;
    if (flags & ~(FR_F_MORE | FR_F_CLOSE)) { PyErr_SetString(PyExc_ValueError, "commit takes F_MORE and F_CLOSE only"); return NULL; }
    if (length < 0) { PyErr_SetString(PyExc_ValueError, "length must be >= 0"); return NULL; }
    if (commit_record(self, pos, (uint64_t)length, flags) < 0) return NULL;
    Py_RETURN_NONE;
}

FR_HIDDEN PyObject *Ring_abort(Ring *self, PyObject *arg) {
    if (writer_only(self) < 0) return NULL;
    unsigned long long pos = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (abort_record(self, pos) < 0) return NULL;
    Py_RETURN_NONE;
}

FR_HIDDEN PyObject *Ring_publish(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (writer_only(self) < 0) return NULL;
    return PyLong_FromLong(do_publish(self));
}

/* write(data, flags=0) -> bool: reserve + copy + commit + publish; False when the ring is full. */
FR_HIDDEN PyObject *Ring_write(Ring *self, PyObject *const *args, Py_ssize_t nargs) {
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
FR_HIDDEN PyObject *Ring_write_many(Ring *self, PyObject *seq) {
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

FR_HIDDEN PyObject *Ring_free(Ring *self, PyObject *Py_UNUSED(ignored)) {
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
    ring_bell(&r->h->space_waiting, &r->h->space_bell, -1, &r->h->space_wanted, head);
}

/* next record: 1 found (*rec filled, handed out), 0 none, -1 error */

FR_HIDDEN int do_peek(Ring *r, rec_t *out) {
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

FR_HIDDEN int release_at(Ring *r, uint64_t pos) {
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

FR_HIDDEN PyObject *Ring_peek(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (reader_only(self) < 0) return NULL;
    rec_t rec;
    int ok = do_peek(self, &rec);
    if (ok < 0) return NULL;
    if (!ok) Py_RETURN_NONE;
    return Py_BuildValue("KKKIK", (unsigned long long)rec.pos, (unsigned long long)rec.offset,
                         (unsigned long long)rec.length, rec.flags, (unsigned long long)rec.seq);
}

FR_HIDDEN PyObject *Ring_release(Ring *self, PyObject *arg) {
    if (reader_only(self) < 0) return NULL;
    unsigned long long pos = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (release_at(self, pos) < 0) return NULL;
    Py_RETURN_NONE;
}

/* Copy a record's payload out and release it. */
FR_HIDDEN PyObject *take_bytes(Ring *r, const rec_t *rec) {
    PyObject *data = copy_out(r, rec);
    if (!data) {
        unpeek(r, rec); /* (no memory) the record stays to be read again */
        return NULL;
    }
    if (release_at(r, rec->pos) < 0) Py_CLEAR(data);
    return data;
}

/* A new bytes object with the payload of `rec` (still held). */
FR_HIDDEN PyObject *copy_out(Ring *r, const rec_t *rec) {
    return PyBytes_FromStringAndSize((const char *)r->view.buf + rec->offset, (Py_ssize_t)rec->length);
}

/* read() -> (bytes, flags) | None: peek + copy + release. */
FR_HIDDEN PyObject *Ring_read(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (reader_only(self) < 0) return NULL;
    rec_t rec;
    int ok = do_peek(self, &rec);
    if (ok < 0) return NULL;
    if (!ok) Py_RETURN_NONE;
    PyObject *data = take_bytes(self, &rec);
    return data ? Py_BuildValue("NI", data, rec.flags) : NULL;
}

/* The next record if it is a whole message (no flags): 1 (handed out, *out filled), 0 when
 * nothing is ready or the next record needs the general path (peek; nothing consumed), -1. */
FR_HIDDEN int peek_plain(Ring *r, rec_t *out) {
    uint64_t pos = r->pos, tail = r->tail_cache;
    if (tail <= pos) {
        if (load_tail(r, &tail) < 0) return -1;
        if (tail <= pos) return 0;
    }
    uint64_t off = pos & r->mask;
    if (r->cap - off >= FR_RECORD_HEADER && tail - pos >= FR_RECORD_HEADER) {
        uint32_t flags = ((volatile fr_record *)(r->data + off))->flags;
        if (flags != 0 && flags != FR_F_PAD) return 0; /* flagged: the general path decides */
    } /* (padding, and the gap at the end, do_peek steps over: the ring wraps in C) */
    int ok = do_peek(r, out);
    if (ok <= 0) return ok;
    if (out->flags) {
        /* the peer changed the flags between our two reads: give the record back unread */
        unpeek(r, out);
        return 0;
    }
    return 1;
}

/* Undo the do_peek that just handed out `rec` (the last record held, nothing read since). */
FR_HIDDEN void unpeek(Ring *r, const rec_t *rec) {
    r->seq = rec->seq;
    r->pos = rec->pos;
    r->nheld--;
}

FR_HIDDEN PyObject *Ring_available(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (reader_only(self) < 0) return NULL;
    uint64_t tail;
    if (self->tail_cache > self->pos) Py_RETURN_TRUE;
    if (load_tail(self, &tail) < 0) return NULL;
    return PyBool_FromLong(tail > self->pos);
}
