/* The shared-memory ring layout, mirrored from src/fable/ring/layout.py (the one definition,
 * with the diagram). tests/test_ring.py compares these numbers with the Python ones through
 * fable._core.LAYOUT; the static asserts below keep the structure honest. */
#ifndef FABLE_RING_H
#define FABLE_RING_H

#include <stddef.h>
#include <stdint.h>

#define FR_CACHE_LINE 64
#define FR_MAGIC 0x474E49524C424146ULL /* "FABLRING" little-endian */
#define FR_VERSION 1u

/* header fields (byte offsets) */
#define FR_MAGIC_OFF 0        /* u64 */
#define FR_VERSION_OFF 8      /* u32 */
#define FR_HEADER_SIZE_OFF 12 /* u32 */
#define FR_CAPACITY 16        /* u64 */
#define FR_TAIL 64            /* u64, writer */
#define FR_WRITER_CPU 72      /* u32, writer */
#define FR_SPACE_WAITING 76   /* u32, writer sets while it sleeps for space */
#define FR_DATA_BELL 80       /* u32, writer rings */
#define FR_SPACE_WANTED 88    /* u64, writer: the HEAD it sleeps for (0: any move) */
#define FR_HEAD 192           /* u64, reader */
#define FR_READER_CPU 200     /* u32, reader */
#define FR_DATA_WAITING 204   /* u32, reader sets while it sleeps for data */
#define FR_SPACE_BELL 208     /* u32, reader rings */
#define FR_HEADER_SIZE 256

/* record fields (byte offsets from the record's start) */
#define FR_REC_LENGTH 0 /* u32 */
#define FR_REC_FLAGS 4  /* u16 */
#define FR_REC_SEQ 8    /* u64 */
#define FR_REC_EPOCH 16 /* u32 */
#define FR_REC_SKIP 20  /* u32 */
#define FR_RECORD_HEADER 24

#define FR_F_MORE 0x1u
#define FR_F_CLOSE 0x2u
#define FR_F_PAD 0x4u
#define FR_KNOWN_FLAGS (FR_F_MORE | FR_F_CLOSE | FR_F_PAD)

/* waiters flag bits (DATA_WAITING / SPACE_WAITING) */
#define FR_WAIT_FUTEX 0x1u  /* sleeping on the doorbell futex */
#define FR_WAIT_EVENT 0x2u  /* armed: signal the reader's eventfd (fileno() users) */

/* How a side waits (the mode of Ring.wait; layout.py: WAIT_SPIN, WAIT_FUTEX, WAIT_ADAPTIVE). */
typedef enum {
    FR_MODE_SPIN = 0,     /* busy-poll the peer's position for the whole slice */
    FR_MODE_FUTEX = 1,    /* sleep on the doorbell at once */
    FR_MODE_ADAPTIVE = 2, /* spin for the budget (not beside the peer), yield, then sleep */
} fr_wait_mode;

#define FR_MIN_CAPACITY 4096ULL
#define FR_MAX_CAPACITY (1ULL << 40)

typedef struct {
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint64_t capacity;
    uint8_t pad0[FR_TAIL - 24];
    uint64_t tail;           /* writer's line */
    uint32_t writer_cpu;
    uint32_t space_waiting;
    uint32_t data_bell;
    uint32_t pad_bell;
    uint64_t space_wanted;
    uint8_t pad1[FR_HEAD - FR_SPACE_WANTED - 8];
    uint64_t head;           /* reader's line */
    uint32_t reader_cpu;
    uint32_t data_waiting;
    uint32_t space_bell;
    uint8_t pad2[FR_HEADER_SIZE - FR_SPACE_BELL - 4];
} fr_header;

typedef struct {
    uint32_t length;
    uint16_t flags;
    uint16_t zero;
    uint64_t seq;
    uint32_t epoch;
    uint32_t skip;
} fr_record;

_Static_assert(offsetof(fr_header, magic) == FR_MAGIC_OFF, "magic");
_Static_assert(offsetof(fr_header, version) == FR_VERSION_OFF, "version");
_Static_assert(offsetof(fr_header, header_size) == FR_HEADER_SIZE_OFF, "header_size");
_Static_assert(offsetof(fr_header, capacity) == FR_CAPACITY, "capacity");
_Static_assert(offsetof(fr_header, tail) == FR_TAIL, "tail");
_Static_assert(offsetof(fr_header, writer_cpu) == FR_WRITER_CPU, "writer_cpu");
_Static_assert(offsetof(fr_header, space_waiting) == FR_SPACE_WAITING, "space_waiting");
_Static_assert(offsetof(fr_header, data_bell) == FR_DATA_BELL, "data_bell");
_Static_assert(offsetof(fr_header, space_wanted) == FR_SPACE_WANTED, "space_wanted");
_Static_assert(offsetof(fr_header, head) == FR_HEAD, "head");
_Static_assert(offsetof(fr_header, reader_cpu) == FR_READER_CPU, "reader_cpu");
_Static_assert(offsetof(fr_header, data_waiting) == FR_DATA_WAITING, "data_waiting");
_Static_assert(offsetof(fr_header, space_bell) == FR_SPACE_BELL, "space_bell");
_Static_assert(sizeof(fr_header) == FR_HEADER_SIZE, "header size");
_Static_assert(FR_HEAD - FR_TAIL >= 2 * FR_CACHE_LINE, "writer and reader lines apart");
_Static_assert(offsetof(fr_record, length) == FR_REC_LENGTH, "rec length");
_Static_assert(offsetof(fr_record, flags) == FR_REC_FLAGS, "rec flags");
_Static_assert(offsetof(fr_record, seq) == FR_REC_SEQ, "rec seq");
_Static_assert(offsetof(fr_record, epoch) == FR_REC_EPOCH, "rec epoch");
_Static_assert(offsetof(fr_record, skip) == FR_REC_SKIP, "rec skip");
_Static_assert(sizeof(fr_record) == FR_RECORD_HEADER, "record header size");

static inline uint64_t fr_align8(uint64_t n) { return (n + 7) & ~(uint64_t)7; }
static inline uint64_t fr_span(uint64_t length, uint64_t skip) {
    return FR_RECORD_HEADER + fr_align8(length) + skip;
}

#endif
