/*
 * gossipfl._merge: the C merge kernel, ``target += sum_m w_m * delta_m``.
 *
 * What it computes is defined by the numpy reference, gossipfl.merge.merge_numpy,
 * and the decoder it calls, gossipfl.codec.decode_delta; the message layout is
 * docs/wire-format.md. This file must agree with them bit for bit, refuse exactly
 * the messages they refuse, and raise the same exception (type, reason, detail and
 * byte offset) for the first fault they would find.
 *
 * Naive way: decode each message into an index array and a float32 value array
 * (what numpy does, in about a dozen passes over temporaries), then scatter-add.
 * Chosen way: per message one validating pass and one writing pass.
 *
 *   validate  (every message of the batch, before anything is written)
 *             1. popcount the unary stream: exactly nnz ones, the last one in
 *                the last byte; then the low stream's zero padding;
 *             2. one fused loop that walks the ones of the unary stream a 64-bit
 *                word at a time (bits reversed per byte once per word, so ctz
 *                finds the next one and w & (w - 1) clears it), takes the
 *                matching Rice low bits from a 64-bit window of the low stream,
 *                and writes each index (uint32: the dimension is a 32-bit field)
 *                to a scratch array, tracking the largest gap; when the batch's
 *                target lines fit in a quarter of the last-level cache, it also
 *                prefetches them for the apply pass;
 *             3. range checks, in the reference's order (largest gap, last
 *                index), then the quantized values and the block scales.
 *   apply     (only when the whole batch validated) per message in batch order,
 *             per block: target[i] += w * ((float)q * scale), read from scratch
 *             with a software prefetch of the target a few entries ahead. The
 *             dense codec is a plain axpy after a finiteness pass.
 *
 * Bounds: the section layout is recomputed here from the header object and must
 * add up to exactly the buffer's length, so every section lies inside it. Step 1
 * proves the unary stream holds exactly nnz ones, so the loop in step 2 needs no
 * per-index check and cannot write past nnz scratch entries. Unaligned 8-byte
 * loads start inside the unary or low stream and may run up to 7 bytes past it;
 * at least SIGNATURE_BYTES (64) bytes follow those streams in every message, so
 * such loads stay inside the buffer. Scratch indices are used for writes only
 * after every gap and the last index have been checked against the dimension;
 * indices are strictly increasing, so the last one bounds them all.
 *
 * Arithmetic: each term is the reference's three float32 operations in the same
 * order, q * scale, then w * value, then target + term. The extension is built
 * with -ffp-contract=off so the compiler does not fuse them into an FMA, which
 * would round once instead of twice and differ from numpy in the last bit.
 * Gaps are uint64 and wrap on overflow exactly like the reference's numpy uint64
 * arithmetic, so even absurd headers are refused for the same reason.
 *
 * The GIL is released for both passes; message buffers are held through the
 * buffer protocol meanwhile. Left out on purpose: threads (the daemon merges on
 * one core and trains on the other) and merging a batch in one sweep over the
 * target (messages from different peers rarely share indices, and batch order
 * must be kept per entry anyway).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <float.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* Wire constants; tests compare them with gossipfl.codec. */
#define HEADER_BYTES 124
#define SIGNATURE_BYTES 64
#define MAX_RICE 31
enum { CODEC_DENSE_F32 = 0, CODEC_TOPK_INT8 = 1, CODEC_TOPK_INT4 = 2 };

/* Tuning: how many entries ahead the apply loop prefetches the target. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 16
#endif

/* Target bytes the validating pass may prefetch: a quarter of the last-level
 * cache, so the lines are still there for the apply pass; 0 where unknown. */
static uint64_t touch_budget_bytes;

static PyObject *DecodeError;    /* gossipfl.errors.DecodeError */
static PyObject *MessageRefused; /* gossipfl.errors.MessageRefused */

/* --- byte order ----------------------------------------------------------- */

static inline uint64_t load_be64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint32_t load_le32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline float load_le_f32(const uint8_t *p)
{
    uint32_t bits = load_le32(p);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline int finite_bits(uint32_t bits)
{
    return (bits & 0x7f800000u) != 0x7f800000u;
}

/* Eight stream bytes as a word whose bit p is stream bit p: the streams are
 * MSB-first within each byte, so the bits of every byte are reversed. Then the
 * lowest set bit is the next one, found with ctz and cleared with w & (w - 1),
 * which keeps the walk's loop-carried chain to one short operation. */
static inline uint64_t load_stream_word(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    v = ((v >> 1) & UINT64_C(0x5555555555555555)) |
        ((v & UINT64_C(0x5555555555555555)) << 1);
    v = ((v >> 2) & UINT64_C(0x3333333333333333)) |
        ((v & UINT64_C(0x3333333333333333)) << 2);
    v = ((v >> 4) & UINT64_C(0x0f0f0f0f0f0f0f0f)) |
        ((v & UINT64_C(0x0f0f0f0f0f0f0f0f)) << 4);
    return v;
}

/* --- one message ---------------------------------------------------------- */

typedef struct {
    Py_buffer view;
    int have_view;
    const uint8_t *data;
    int codec;
    uint64_t dim, nnz, block, rice, unary_len, low_len;
    uint64_t unary_off, low_off, values_off, values_len, scales_off, nblocks;
    float weight;
    uint32_t *indices; /* nnz entries of the batch's scratch array */
    const float *touch; /* target to prefetch while decoding, or NULL */
} Message;

/* The first fault found in a message, in the reference's checking order. */
typedef enum {
    FAULT_NONE = 0,
    FAULT_EMPTY_UNARY,
    FAULT_UNARY_SHORT,
    FAULT_UNARY_TRAILING,
    FAULT_LOW_PADDING,
    FAULT_GAP_RANGE,
    FAULT_INDEX_RANGE,
    FAULT_INT4_PADDING,
    FAULT_VALUE_BELOW,
    FAULT_SCALE,
    FAULT_DENSE_VALUE,
} FaultKind;

typedef struct {
    FaultKind kind;
    uint64_t offset; /* byte offset, for the DecodeError faults */
    uint64_t count;  /* ones found, gap, index, block or position */
    double value;    /* the offending float */
} Fault;

static inline int qmax_of(int codec)
{
    return codec == CODEC_TOPK_INT4 ? 7 : 127;
}

/* The largest scale the reference accepts: float32(FLT_MAX / qmax). */
static inline float scale_limit(int codec)
{
    return (float)((double)FLT_MAX / qmax_of(codec));
}

/* Byte (within the unary stream) holding the n-th one, n >= 1; error path only. */
static uint64_t byte_of_nth_one(const uint8_t *u, uint64_t len, uint64_t n)
{
    uint64_t seen = 0;
    for (uint64_t i = 0; i < len; i++) {
        seen += (uint64_t)__builtin_popcount(u[i]);
        if (seen >= n)
            return i;
    }
    return len - 1; /* unreachable: callers know there are at least n ones */
}

static FaultKind fail(Fault *f, FaultKind kind, uint64_t offset, uint64_t count,
                      double value)
{
    f->kind = kind;
    f->offset = offset;
    f->count = count;
    f->value = value;
    return kind;
}

/* What the walk over the ones of a unary stream found. */
typedef struct {
    uint64_t next;    /* last index + 1 */
    uint64_t max_gap; /* largest gap, wrapped like numpy's uint64 */
} Walk;

/* The fused loop: each one bit of the unary stream ends a gap's high part; its
 * low part comes from a 64-bit window of the low stream. Each index goes to
 * ``out``. The caller has proved the stream holds exactly as many ones as ``out``
 * has room for. Inlined twice, with and without low parts. */
static inline __attribute__((always_inline)) Walk
walk_ones(const uint8_t *u, uint64_t len, const uint8_t *low, const unsigned rice,
          uint32_t *out, const float *touch, uint64_t dim)
{
    uint64_t prev = UINT64_MAX; /* bit position of the previous one, -1 at start */
    uint64_t next = 0, max_gap = 0, lowbit = 0;
    const uint64_t full = len / 8;
    for (uint64_t w = 0; w <= full; w++) {
        uint64_t word;
        if (w < full) {
            word = load_stream_word(u + 8 * w);
        } else {
            uint8_t last[8] = {0};
            memcpy(last, u + 8 * full, len % 8);
            word = load_stream_word(last);
        }
        const uint64_t base = 64 * w;
        while (word) {
            const uint64_t at = base + (uint64_t)__builtin_ctzll(word);
            word &= word - 1;
            uint64_t gap = (at - prev - 1) << rice;
            prev = at;
            if (rice) {
                const uint64_t window = load_be64(low + (lowbit >> 3));
                gap |= (window << (lowbit & 7)) >> (64 - rice);
                lowbit += rice;
            }
            max_gap = gap > max_gap ? gap : max_gap;
            next += gap + 1;
            *out++ = (uint32_t)(next - 1);
            if (touch)
                __builtin_prefetch(touch + (next - 1 < dim ? next - 1 : 0), 1, 1);
        }
    }
    return (Walk){next, max_gap};
}

static __attribute__((noinline)) Walk walk_unary(const uint8_t *u, uint64_t len,
                                                 uint32_t *out, const float *touch,
                                                 uint64_t dim)
{
    return walk_ones(u, len, NULL, 0, out, touch, dim);
}

static __attribute__((noinline)) Walk walk_rice(const uint8_t *u, uint64_t len,
                                                const uint8_t *low, unsigned rice,
                                                uint32_t *out, const float *touch,
                                                uint64_t dim)
{
    return walk_ones(u, len, low, rice, out, touch, dim);
}

/* Decode the indices of a sparse message into m->indices; no writes elsewhere. */
static FaultKind decode_indices(Message *m, Fault *f)
{
    const uint8_t *u = m->data + m->unary_off;
    const uint8_t *low = m->data + m->low_off;
    const uint64_t nnz = m->nnz, rice = m->rice, len = m->unary_len;

    if (nnz == 0) {
        if (len)
            return fail(f, FAULT_EMPTY_UNARY, m->unary_off, 0, 0.0);
        return FAULT_NONE;
    }

    /* structure: exactly nnz ones, the last one in the last byte */
    const uint64_t full = len / 8;
    uint64_t ones = 0;
    for (uint64_t w = 0; w < full; w++)
        ones += (uint64_t)__builtin_popcountll(load_be64(u + 8 * w));
    uint64_t tail = 0;
    for (uint64_t i = 8 * full; i < len; i++)
        tail |= (uint64_t)u[i] << (56 - 8 * (i - 8 * full));
    ones += (uint64_t)__builtin_popcountll(tail);
    if (ones < nnz)
        return fail(f, FAULT_UNARY_SHORT, m->unary_off + len, ones, 0.0);
    if (ones > nnz || u[len - 1] == 0)
        return fail(f, FAULT_UNARY_TRAILING,
                    m->unary_off + byte_of_nth_one(u, len, nnz), 0, 0.0);

    /* low stream: the bits after the last low part are zero */
    if (rice) {
        const unsigned pad = (unsigned)(8 * m->low_len - nnz * rice);
        if (pad && (low[m->low_len - 1] & ((1u << pad) - 1)))
            return fail(f, FAULT_LOW_PADDING, m->low_off + m->low_len - 1, 0, 0.0);
    }

    /* the fused loop, then range as the reference: no gap may pass the end,
     * then the last index */
    Walk walk = rice ? walk_rice(u, len, low, (unsigned)rice, m->indices, m->touch,
                                 m->dim)
                     : walk_unary(u, len, m->indices, m->touch, m->dim);
    const uint64_t max_gap = walk.max_gap, next = walk.next;
    if (max_gap >= m->dim)
        return fail(f, FAULT_GAP_RANGE, 0, max_gap, 0.0);
    if (next - 1 >= m->dim)
        return fail(f, FAULT_INDEX_RANGE, 0, next - 1, 0.0);
    return FAULT_NONE;
}

static FaultKind check_values(const Message *m, Fault *f)
{
    const uint8_t *v = m->data + m->values_off;
    if (m->codec == CODEC_TOPK_INT8) {
        const uint8_t *bad = memchr(v, 0x80, m->values_len);
        if (bad)
            return fail(f, FAULT_VALUE_BELOW, m->values_off + (uint64_t)(bad - v),
                        0, -128.0);
        return FAULT_NONE;
    }
    /* int4: the padding nibble first, then -8 (nibble 0x8) anywhere */
    if (m->nnz % 2 && (v[m->values_len - 1] >> 4))
        return fail(f, FAULT_INT4_PADDING, m->scales_off - 1, 0, 0.0);
    for (uint64_t i = 0; i < m->values_len; i++)
        if ((v[i] & 0x0f) == 0x08 || (v[i] >> 4) == 0x08)
            return fail(f, FAULT_VALUE_BELOW, m->values_off + i, 0, -8.0);
    return FAULT_NONE;
}

static FaultKind check_scales(const Message *m, Fault *f)
{
    const uint8_t *s = m->data + m->scales_off;
    const float limit = scale_limit(m->codec);
    for (uint64_t b = 0; b < m->nblocks; b++) {
        const float scale = load_le_f32(s + 4 * b);
        if (!(finite_bits(load_le32(s + 4 * b)) && scale >= 0.0f && scale <= limit))
            return fail(f, FAULT_SCALE, 0, b, (double)scale);
    }
    return FAULT_NONE;
}

static FaultKind check_dense(const Message *m, Fault *f)
{
    const uint8_t *v = m->data + m->values_off;
    uint32_t all_finite = 1;
    for (uint64_t i = 0; i < m->dim; i++)
        all_finite &= (uint32_t)finite_bits(load_le32(v + 4 * i));
    if (all_finite)
        return FAULT_NONE;
    for (uint64_t i = 0; i < m->dim; i++)
        if (!finite_bits(load_le32(v + 4 * i)))
            return fail(f, FAULT_DENSE_VALUE, 0, i, (double)load_le_f32(v + 4 * i));
    return FAULT_NONE;
}

static FaultKind validate(Message *m, Fault *f)
{
    FaultKind k;
    if (m->codec == CODEC_DENSE_F32)
        return check_dense(m, f);
    if ((k = decode_indices(m, f)) != FAULT_NONE)
        return k;
    if ((k = check_values(m, f)) != FAULT_NONE)
        return k;
    return check_scales(m, f);
}

/* --- writing -------------------------------------------------------------- */

static inline int8_t int4_at(const uint8_t *v, uint64_t j)
{
    const uint8_t byte = v[j >> 1];
    /* earlier value in the low nibble; shift it up, then sign-extend down */
    return j & 1 ? (int8_t)((int8_t)byte >> 4) : (int8_t)((int8_t)(byte << 4) >> 4);
}

static void apply_sparse(const Message *m, float *target)
{
    const uint8_t *v = m->data + m->values_off;
    const uint8_t *s = m->data + m->scales_off;
    const uint32_t *idx = m->indices; /* readable PREFETCH_AHEAD past nnz */
    const float w = m->weight;
    const int int4 = m->codec == CODEC_TOPK_INT4;

    for (uint64_t b = 0; b < m->nblocks; b++) {
        const float scale = load_le_f32(s + 4 * b);
        const uint64_t start = b * m->block;
        const uint64_t stop = start + m->block < m->nnz ? start + m->block : m->nnz;
        if (int4) {
            for (uint64_t j = start; j < stop; j++) {
                __builtin_prefetch(target + idx[j + PREFETCH_AHEAD], 1);
                const float term = w * ((float)int4_at(v, j) * scale);
                target[idx[j]] = target[idx[j]] + term;
            }
        } else {
            for (uint64_t j = start; j < stop; j++) {
                __builtin_prefetch(target + idx[j + PREFETCH_AHEAD], 1);
                const float term = w * ((float)(int8_t)v[j] * scale);
                target[idx[j]] = target[idx[j]] + term;
            }
        }
    }
}

static void apply_dense(const Message *m, float *target)
{
    const uint8_t *v = m->data + m->values_off;
    const float w = m->weight;
    for (uint64_t i = 0; i < m->dim; i++) {
        const float term = w * load_le_f32(v + 4 * i);
        target[i] = target[i] + term;
    }
}

/* --- from Python ---------------------------------------------------------- */

static int header_u64(PyObject *header, const char *name, uint64_t *out)
{
    PyObject *value = PyObject_GetAttrString(header, name);
    if (!value)
        return -1;
    *out = PyLong_AsUnsignedLongLong(value);
    Py_DECREF(value);
    if (*out == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    return 0;
}

/* Read the header object and lay out the sections; refuse a header that does not
 * describe ``m->view`` (parse_header never produces one). */
static int load_message(Message *m, PyObject *item, Py_ssize_t n)
{
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
        PyErr_Format(PyExc_TypeError,
                     "batch entry %zd must be a (data, header) tuple", n);
        return -1;
    }
    PyObject *header = PyTuple_GET_ITEM(item, 1);
    uint64_t codec;
    if (header_u64(header, "codec", &codec) || header_u64(header, "dim", &m->dim) ||
        header_u64(header, "nnz", &m->nnz) || header_u64(header, "block", &m->block) ||
        header_u64(header, "rice", &m->rice) ||
        header_u64(header, "unary_len", &m->unary_len) ||
        header_u64(header, "low_len", &m->low_len))
        return -1;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 0), &m->view, PyBUF_SIMPLE))
        return -1;
    m->have_view = 1;
    m->data = m->view.buf;

    int ok = codec <= CODEC_TOPK_INT4 && m->dim <= UINT32_MAX;
    m->codec = (int)codec;
    if (ok && m->codec == CODEC_DENSE_F32) {
        ok = m->nnz == m->dim && m->block == 0 && m->rice == 0 &&
             m->unary_len == 0 && m->low_len == 0;
        m->values_len = 4 * m->dim;
        m->nblocks = 0;
    } else if (ok) {
        ok = m->nnz <= m->dim && m->block >= 1 && m->rice <= MAX_RICE &&
             m->low_len == (m->nnz * m->rice + 7) / 8 &&
             m->unary_len >= (m->nnz + 7) / 8 && m->unary_len <= UINT32_MAX;
        m->values_len = m->codec == CODEC_TOPK_INT4 ? (m->nnz + 1) / 2 : m->nnz;
        m->nblocks = ok ? (m->nnz + m->block - 1) / m->block : 0;
    }
    m->unary_off = HEADER_BYTES;
    m->low_off = m->unary_off + m->unary_len;
    m->values_off = m->low_off + m->low_len;
    m->scales_off = m->values_off + m->values_len;
    const uint64_t total = m->scales_off + 4 * m->nblocks + SIGNATURE_BYTES;
    if (!ok || total != (uint64_t)m->view.len) {
        PyErr_Format(PyExc_ValueError,
                     "batch entry %zd: header does not describe its %zd-byte "
                     "message", n, m->view.len);
        return -1;
    }
    return 0;
}

static int check_target(PyObject *obj)
{
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != NPY_FLOAT32 ||
        !PyArray_ISNOTSWAPPED((PyArrayObject *)obj)) {
        PyErr_SetString(PyExc_TypeError, "merge target must be a float32 array");
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_NDIM(a) != 1 || !PyArray_IS_C_CONTIGUOUS(a) ||
        !PyArray_ISWRITEABLE(a) || !PyArray_ISALIGNED(a)) {
        PyErr_SetString(PyExc_ValueError,
                        "merge target must be a writeable, aligned, contiguous "
                        "1-d array");
        return -1;
    }
    return 0;
}

/* repr(value), or format(value, spec), exactly as the reference's f-strings. */
static PyObject *float_text(double value, const char *spec)
{
    PyObject *f = PyFloat_FromDouble(value), *text = NULL;
    if (!f)
        return NULL;
    if (!spec) {
        text = PyObject_Repr(f);
    } else {
        PyObject *format = PyUnicode_FromString(spec);
        if (format)
            text = PyObject_Format(f, format);
        Py_XDECREF(format);
    }
    Py_DECREF(f);
    return text;
}

/* Raise what gossipfl.codec.decode_delta raises for this fault, word for word. */
static void raise_fault(const Message *m, const Fault *f)
{
    PyObject *detail = NULL, *exc = NULL, *a = NULL, *b = NULL;
    const char *reason = NULL; /* NULL: a DecodeError */

    switch (f->kind) {
    case FAULT_EMPTY_UNARY:
        detail = PyUnicode_FromString(
            "an empty message must have an empty unary stream");
        break;
    case FAULT_UNARY_SHORT:
        detail = PyUnicode_FromFormat("unary stream ends after %llu of %llu indices",
                                      (unsigned long long)f->count,
                                      (unsigned long long)m->nnz);
        break;
    case FAULT_UNARY_TRAILING:
        detail = PyUnicode_FromString(
            "unary stream has bits or bytes after its last index");
        break;
    case FAULT_LOW_PADDING:
        detail = PyUnicode_FromString("low stream padding is not zero");
        break;
    case FAULT_GAP_RANGE:
        reason = "index-range";
        detail = PyUnicode_FromFormat("an index gap of %llu reaches past dimension "
                                      "%llu", (unsigned long long)f->count,
                                      (unsigned long long)m->dim);
        break;
    case FAULT_INDEX_RANGE:
        reason = "index-range";
        detail = PyUnicode_FromFormat("index %llu is out of range for dimension %llu",
                                      (unsigned long long)f->count,
                                      (unsigned long long)m->dim);
        break;
    case FAULT_INT4_PADDING:
        detail = PyUnicode_FromString("int4 padding nibble is not zero");
        break;
    case FAULT_VALUE_BELOW:
        detail = PyUnicode_FromFormat("quantized value %d is below -%d",
                                      (int)f->value, qmax_of(m->codec));
        break;
    case FAULT_SCALE:
        reason = "non-finite";
        a = float_text(f->value, NULL);
        b = float_text((double)scale_limit(m->codec), ".3e");
        if (a && b)
            detail = PyUnicode_FromFormat("block %llu scale %U is not in [0, %U]",
                                          (unsigned long long)f->count, a, b);
        break;
    case FAULT_DENSE_VALUE:
        reason = "non-finite";
        a = float_text(f->value, NULL);
        if (a)
            detail = PyUnicode_FromFormat("value %U at index %llu", a,
                                          (unsigned long long)f->count);
        break;
    case FAULT_NONE:
        PyErr_SetString(PyExc_SystemError, "raise_fault without a fault");
        return;
    }
    if (detail) {
        if (reason)
            exc = PyObject_CallFunction(MessageRefused, "sO", reason, detail);
        else
            exc = PyObject_CallFunction(DecodeError, "OK", detail,
                                        (unsigned long long)f->offset);
    }
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    Py_XDECREF(detail);
    Py_XDECREF(a);
    Py_XDECREF(b);
}

PyDoc_STRVAR(merge_doc,
"merge(target, batch, weights)\n--\n\n"
"target += sum(w * delta) over the (data, header) messages of batch, in order.\n"
"Same contract as gossipfl.merge.merge_numpy; nothing is written unless every\n"
"message of the batch is valid.");

static PyObject *merge(PyObject *self, PyObject *args)
{
    PyObject *target_obj, *batch_obj, *weights_obj;
    PyObject *batch = NULL, *weights = NULL, *result = NULL;
    Message *msgs = NULL;
    uint32_t *scratch = NULL;
    Py_ssize_t n = 0, bad = -1;
    Fault fault = {FAULT_NONE, 0, 0, 0.0};
    (void)self;

    if (!PyArg_ParseTuple(args, "OOO:merge", &target_obj, &batch_obj, &weights_obj))
        return NULL;
    if (check_target(target_obj))
        return NULL;
    PyArrayObject *target_arr = (PyArrayObject *)target_obj;
    const uint64_t size = (uint64_t)PyArray_SIZE(target_arr);

    batch = PySequence_Fast(batch_obj, "batch must be a sequence");
    if (!batch)
        goto done;
    weights = PySequence_Fast(weights_obj, "weights must be a sequence");
    if (!weights)
        goto done;
    n = PySequence_Fast_GET_SIZE(batch);
    if (PySequence_Fast_GET_SIZE(weights) != n) {
        PyErr_Format(PyExc_ValueError, "%zd messages but %zd weights", n,
                     PySequence_Fast_GET_SIZE(weights));
        goto done;
    }
    msgs = PyMem_Calloc((size_t)n + 1, sizeof *msgs);
    if (!msgs) {
        PyErr_NoMemory();
        goto done;
    }

    /* everything that needs Python, before the GIL is let go */
    uint64_t total_nnz = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Message *m = &msgs[i];
        if (load_message(m, PySequence_Fast_GET_ITEM(batch, i), i))
            goto done;
        if (m->dim != size) {
            PyErr_Format(PyExc_ValueError, "message dimension %llu does not match "
                         "the target's %llu", (unsigned long long)m->dim,
                         (unsigned long long)size);
            goto done;
        }
        const double w = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(weights, i));
        if (w == -1.0 && PyErr_Occurred())
            goto done;
        m->weight = (float)w;
        if (m->codec != CODEC_DENSE_F32)
            total_nnz += m->nnz;
    }
    scratch = PyMem_RawCalloc(total_nnz + PREFETCH_AHEAD, sizeof *scratch);
    if (!scratch) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t used = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (msgs[i].codec != CODEC_DENSE_F32) {
            msgs[i].indices = scratch + used;
            used += msgs[i].nnz;
        }
    }

    float *target = PyArray_DATA(target_arr);
    /* Prefetch the target's lines while validating only if they will still be in
     * cache when the apply pass comes to them. */
    if (total_nnz * 64 <= touch_budget_bytes)
        for (Py_ssize_t i = 0; i < n; i++)
            msgs[i].touch = target;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && bad < 0; i++)
        if (validate(&msgs[i], &fault) != FAULT_NONE)
            bad = i;
    for (Py_ssize_t i = 0; i < n && bad < 0; i++) {
        if (msgs[i].codec == CODEC_DENSE_F32)
            apply_dense(&msgs[i], target);
        else
            apply_sparse(&msgs[i], target);
    }
    Py_END_ALLOW_THREADS

    if (bad >= 0)
        raise_fault(&msgs[bad], &fault);
    else
        result = Py_NewRef(Py_None);

done:
    if (msgs)
        for (Py_ssize_t i = 0; i < n; i++)
            if (msgs[i].have_view)
                PyBuffer_Release(&msgs[i].view);
    PyMem_RawFree(scratch);
    PyMem_Free(msgs);
    Py_XDECREF(batch);
    Py_XDECREF(weights);
    return result;
}

static PyMethodDef methods[] = {
    {"merge", merge, METH_VARARGS, merge_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gossipfl._merge",
    "Fused decode and weighted scatter-add of delta messages (C kernel).", -1,
    methods, NULL, NULL, NULL, NULL,
};

static uint64_t last_level_cache_bytes(void)
{
    long bytes = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
    bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (bytes <= 0)
        bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return bytes > 0 ? (uint64_t)bytes : 0;
}

PyMODINIT_FUNC PyInit__merge(void)
{
    import_array();
    touch_budget_bytes = last_level_cache_bytes() / 4;
    PyObject *errors = PyImport_ImportModule("gossipfl.errors");
    if (!errors)
        return NULL;
    DecodeError = PyObject_GetAttrString(errors, "DecodeError");
    MessageRefused = PyObject_GetAttrString(errors, "MessageRefused");
    Py_DECREF(errors);
    if (!DecodeError || !MessageRefused)
        return NULL;

    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "HEADER_BYTES", HEADER_BYTES) ||
        PyModule_AddIntConstant(m, "SIGNATURE_BYTES", SIGNATURE_BYTES) ||
        PyModule_AddIntConstant(m, "MAX_RICE", MAX_RICE)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
