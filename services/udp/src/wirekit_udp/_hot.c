/* The C build of wirekit_udp._hot (the pure-Python module of the same name is the fallback
 * and the reference: same names, same behaviour, same tests -- `make test-compiled`).
 *
 * What it is for: udp's per-datagram path is a dozen checks, each a few Python-level
 * attribute reads, and two token buckets (the global one and the source's); in Python they
 * cost twice what a bare uvloop echo costs in all. Here the state they touch lives in C
 * structures: a datagram that is answered costs a read of the clock (a call where the clock is
 * not time.monotonic), the loop key (a keyed hash of the payload that is not Python's: see
 * loop_key below), a probe of the loop table (LoopTable, C's: no objects made) and one of the
 * limiter's dict, the bucket arithmetic and the one call it must make: transport.sendto().
 * Everything rare goes to the same Python code as the pure build: UdpEcho._drop, _judge,
 * _send_empty, LoopGuard.answered (a full table).
 *
 * TokenBucket and SourceLimiter are wirekit_servicekit.ratelimit's, in C: the same attributes,
 * methods and results (the same float operations in the same order). A limiter's table is a
 * dict of buckets, ordered least recently seen first by a list through the buckets.
 *
 * Only CPython's public C API is used (no internals); built by tools/hatch_cext.py. The one
 * place the builds differ is the loop key's hash (`loop_key`: the same rule, another keyed
 * hash), so the tests compare the two builds' loop tables by what each key stands for.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

static PyObject *str_drop, *str_judge, *str_send_empty, *str_answered;
static PyObject *reason_oversize, *reason_privileged_port, *reason_denied_port,
    *reason_broadcast_multicast, *reason_loop, *reason_rate_limit_global,
    *reason_rate_limit_source;
static PyObject *source_key; /* wirekit_udp.defences.source_key */
static PyObject *monotonic;  /* time.monotonic */

/* -- Cell: one counter value (wirekit_servicekit.metrics.Cell's interface) ------------------ */

typedef struct {
    PyObject_HEAD
    long long n;
} CellObject;

static PyMemberDef Cell_members[] = {
    {"n", T_LONGLONG, offsetof(CellObject, n), 0, "The value."},
    {NULL},
};

static PyTypeObject CellType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wirekit_udp._hot.Cell",
    .tp_doc = "One counter value: cell.n += k (a C long long).",
    .tp_basicsize = sizeof(CellObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_members = Cell_members,
};

/* -- TokenBucket ------------------------------------------------------------------------------ */

typedef struct BucketObject {
    PyObject_HEAD
    double rate, burst, tokens, stamp;
    char limited; /* SourceLimiter's bookkeeping: its last allow() was refused */
    /* In a SourceLimiter's table: its key there, and its neighbours in the limiter's list
     * (least recently seen first; borrowed: the table holds the buckets). */
    PyObject *key;
    struct BucketObject *prev, *next;
} BucketObject;

static PyTypeObject BucketType;

static int
Bucket_traverse(BucketObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->key);
    return 0;
}

static int
Bucket_clear(BucketObject *self)
{
    Py_CLEAR(self->key);
    return 0;
}

static void
Bucket_dealloc(BucketObject *self)
{
    PyObject_GC_UnTrack(self);
    Bucket_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A number as a C double, as Python's float arithmetic would take it. */
static inline int
as_double(PyObject *value, double *out)
{
    if (PyFloat_CheckExact(value)) {
        *out = PyFloat_AS_DOUBLE(value);
        return 0;
    }
    *out = PyFloat_AsDouble(value);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static inline void
bucket_set(BucketObject *self, double rate, double burst, double now)
{
    self->rate = rate;
    self->burst = burst;
    self->tokens = burst;
    self->stamp = now;
    self->limited = 0;
}

static int
Bucket_init(BucketObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"rate", "burst", "now", NULL};
    PyObject *rate, *burst, *now;
    double r, b, t;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:TokenBucket", kwlist, &rate, &burst, &now))
        return -1;
    if (as_double(rate, &r) < 0 || as_double(burst, &b) < 0 || as_double(now, &t) < 0)
        return -1;
    bucket_set(self, r, b, t);
    return 0;
}

/* min(self.burst, ...): Python's min keeps the first unless the second is smaller (NaN). */
static inline double
bucket_level(BucketObject *self, double now)
{
    double level = self->tokens + (now - self->stamp) * self->rate;
    return level < self->burst ? level : self->burst;
}

/* TokenBucket.take */
static inline int
bucket_take(BucketObject *self, double now)
{
    double tokens = self->tokens + (now - self->stamp) * self->rate;
    if (tokens > self->burst)
        tokens = self->burst;
    self->stamp = now;
    if (tokens >= 1.0) {
        self->tokens = tokens - 1.0;
        return 1;
    }
    self->tokens = tokens;
    return 0;
}

static int
parse_now(PyObject *args, PyObject *kwds, const char *format, double *now)
{
    static char *kwlist[] = {"now", NULL};
    PyObject *value;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, format, kwlist, &value))
        return -1;
    return as_double(value, now);
}

static PyObject *
Bucket_level(BucketObject *self, PyObject *args, PyObject *kwds)
{
    double now;
    if (parse_now(args, kwds, "O:level", &now) < 0)
        return NULL;
    return PyFloat_FromDouble(bucket_level(self, now));
}

static PyObject *
Bucket_ready(BucketObject *self, PyObject *args, PyObject *kwds)
{
    double now;
    if (parse_now(args, kwds, "O:ready", &now) < 0)
        return NULL;
    return PyBool_FromLong(bucket_level(self, now) >= 1.0);
}

/* max(0.0, 1.0 - level) / rate: max keeps the first unless the second is larger (NaN). */
static PyObject *
bucket_wait_s(BucketObject *self, double now)
{
    double missing = 1.0 - bucket_level(self, now);
    double wait = missing > 0.0 ? missing : 0.0;
    if (self->rate == 0.0) {
        PyErr_SetString(PyExc_ZeroDivisionError, "float division by zero");
        return NULL;
    }
    return PyFloat_FromDouble(wait / self->rate);
}

static PyObject *
Bucket_wait_s(BucketObject *self, PyObject *args, PyObject *kwds)
{
    double now;
    if (parse_now(args, kwds, "O:wait_s", &now) < 0)
        return NULL;
    return bucket_wait_s(self, now);
}

static PyObject *
Bucket_take(BucketObject *self, PyObject *args, PyObject *kwds)
{
    double now;
    if (parse_now(args, kwds, "O:take", &now) < 0)
        return NULL;
    return PyBool_FromLong(bucket_take(self, now));
}

static PyMethodDef Bucket_methods[] = {
    {"level", (PyCFunction)(void (*)(void))Bucket_level, METH_VARARGS | METH_KEYWORDS,
     "The tokens it holds at now (nothing is taken)."},
    {"ready", (PyCFunction)(void (*)(void))Bucket_ready, METH_VARARGS | METH_KEYWORDS,
     "Whether a take() now would succeed (nothing is taken)."},
    {"wait_s", (PyCFunction)(void (*)(void))Bucket_wait_s, METH_VARARGS | METH_KEYWORDS,
     "Seconds until a take() would succeed (0 when it would now)."},
    {"take", (PyCFunction)(void (*)(void))Bucket_take, METH_VARARGS | METH_KEYWORDS,
     "Take one token at now: whether there was one."},
    {NULL},
};

static PyMemberDef Bucket_members[] = {
    {"rate", T_DOUBLE, offsetof(BucketObject, rate), 0, "Tokens per second."},
    {"burst", T_DOUBLE, offsetof(BucketObject, burst), 0, "The most tokens it holds."},
    {"tokens", T_DOUBLE, offsetof(BucketObject, tokens), 0, "The tokens at stamp."},
    {"stamp", T_DOUBLE, offsetof(BucketObject, stamp), 0, "When tokens was last computed."},
    {"limited", T_BOOL, offsetof(BucketObject, limited), 0,
     "SourceLimiter's bookkeeping: its last allow() was refused."},
    {NULL},
};

static PyTypeObject BucketType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wirekit_udp._hot.TokenBucket",
    .tp_doc = "TokenBucket(rate, burst, now): rate tokens per second up to burst; each event "
              "takes one (wirekit_servicekit.ratelimit.TokenBucket in C).",
    .tp_basicsize = sizeof(BucketObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Bucket_init,
    .tp_dealloc = (destructor)Bucket_dealloc,
    .tp_traverse = (traverseproc)Bucket_traverse,
    .tp_clear = (inquiry)Bucket_clear,
    .tp_methods = Bucket_methods,
    .tp_members = Bucket_members,
};

/* -- SourceLimiter ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    double rate, burst;
    Py_ssize_t limit;
    Py_ssize_t limited; /* sources whose last allow() was refused */
    PyObject *table;    /* dict: source -> TokenBucket */
    BucketObject *oldest, *newest; /* the buckets, least recently seen first (borrowed) */
} LimiterObject;

static PyTypeObject LimiterType;

static int
Limiter_traverse(LimiterObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->table);
    return 0;
}

static int
Limiter_clear(LimiterObject *self)
{
    self->oldest = self->newest = NULL;
    Py_CLEAR(self->table);
    return 0;
}

static void
Limiter_dealloc(LimiterObject *self)
{
    PyObject_GC_UnTrack(self);
    Limiter_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Limiter_init(LimiterObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"rate", "burst", "limit", NULL};
    PyObject *rate, *burst;
    Py_ssize_t limit;
    double r, b;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOn:SourceLimiter", kwlist, &rate, &burst,
                                     &limit))
        return -1;
    if (as_double(rate, &r) < 0 || as_double(burst, &b) < 0)
        return -1;
    PyObject *table = PyDict_New();
    if (table == NULL)
        return -1;
    self->oldest = self->newest = NULL; /* before the old table (and its buckets) goes */
    Py_XSETREF(self->table, table);
    self->rate = r;
    self->burst = b;
    self->limit = limit;
    self->limited = 0;
    return 0;
}

static inline void
list_unlink(LimiterObject *self, BucketObject *b)
{
    if (b->prev)
        b->prev->next = b->next;
    else
        self->oldest = b->next;
    if (b->next)
        b->next->prev = b->prev;
    else
        self->newest = b->prev;
    b->prev = b->next = NULL;
}

static inline void
list_append(LimiterObject *self, BucketObject *b)
{
    b->prev = self->newest;
    b->next = NULL;
    if (self->newest)
        self->newest->next = b;
    else
        self->oldest = b;
    self->newest = b;
}

static int
limiter_ready(LimiterObject *self)
{
    if (self->table == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "SourceLimiter is not initialised");
        return -1;
    }
    return 0;
}

/* SourceLimiter.allow: 1 allowed, 0 refused, -1 an error. */
static int
limiter_allow(LimiterObject *self, PyObject *source, double now)
{
    PyObject *table = self->table;
    BucketObject *bucket = (BucketObject *)PyDict_GetItemWithError(table, source);
    if (bucket == NULL) {
        if (PyErr_Occurred())
            return -1;
        if (PyDict_GET_SIZE(table) >= self->limit) {
            BucketObject *evicted = self->oldest;
            if (evicted == NULL) { /* OrderedDict.popitem() of an empty table */
                PyErr_SetString(PyExc_KeyError, "dictionary is empty");
                return -1;
            }
            if (evicted->key == NULL) {
                PyErr_SetString(PyExc_RuntimeError, "SourceLimiter's table was cleared");
                return -1;
            }
            /* held while the table lets go of it: unlinked only once it is out of the table
             * (a failed delete leaves both as they were) */
            Py_INCREF(evicted);
            if (PyDict_DelItem(table, evicted->key) < 0) {
                Py_DECREF(evicted);
                return -1;
            }
            list_unlink(self, evicted);
            self->limited -= evicted->limited;
            Py_DECREF(evicted);
        }
        bucket = PyObject_GC_New(BucketObject, &BucketType);
        if (bucket == NULL)
            return -1;
        /* The allocation may have run a collection, and a finalizer this limiter: the source
         * may have a bucket now. Then that one is used (never replaced while linked). */
        BucketObject *found = (BucketObject *)PyDict_GetItemWithError(table, source);
        if (found != NULL || PyErr_Occurred()) {
            bucket->key = NULL;
            bucket->prev = bucket->next = NULL;
            Py_DECREF(bucket); /* untracked, key NULL: the dealloc is safe */
            if (found == NULL)
                return -1;
            bucket = found;
            if (bucket != self->newest) {
                list_unlink(self, bucket);
                list_append(self, bucket);
            }
            goto take;
        }
        bucket_set(bucket, self->rate, self->burst, now);
        Py_INCREF(source);
        bucket->key = source;
        bucket->prev = bucket->next = NULL;
        PyObject_GC_Track(bucket);
        int failed = PyDict_SetItem(table, source, (PyObject *)bucket);
        Py_DECREF(bucket); /* the table's now */
        if (failed)
            return -1;
        list_append(self, bucket);
    } else if (bucket != self->newest) {
        list_unlink(self, bucket);
        list_append(self, bucket);
    }
take:
    /* bucket.take(now), and the limited bookkeeping */
    double tokens = bucket->tokens + (now - bucket->stamp) * bucket->rate;
    if (tokens > bucket->burst)
        tokens = bucket->burst;
    bucket->stamp = now;
    int ok = tokens >= 1.0;
    bucket->tokens = ok ? tokens - 1.0 : tokens;
    if (ok == bucket->limited) { /* the source changed state (limited <-> not limited) */
        self->limited += ok ? -1 : 1;
        bucket->limited = !ok;
    }
    return ok;
}

static PyObject *
Limiter_allow(LimiterObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"source", "now", NULL};
    PyObject *source, *when;
    double now;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:allow", kwlist, &source, &when)
        || as_double(when, &now) < 0 || limiter_ready(self) < 0)
        return NULL;
    int ok = limiter_allow(self, source, now);
    return ok < 0 ? NULL : PyBool_FromLong(ok);
}

/* The source's bucket, borrowed; NULL without an error when the table has none. */
static BucketObject *
limiter_find(LimiterObject *self, PyObject *args, PyObject *kwds, const char *format,
             double *now)
{
    static char *kwlist[] = {"source", "now", NULL};
    PyObject *source, *when;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, format, kwlist, &source, &when)
        || as_double(when, now) < 0 || limiter_ready(self) < 0)
        return NULL;
    return (BucketObject *)PyDict_GetItemWithError(self->table, source);
}

static PyObject *
Limiter_ready(LimiterObject *self, PyObject *args, PyObject *kwds)
{
    double now;
    BucketObject *bucket = limiter_find(self, args, kwds, "OO:ready", &now);
    if (bucket == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_True);
    return PyBool_FromLong(bucket_level(bucket, now) >= 1.0);
}

static PyObject *
Limiter_wait_s(LimiterObject *self, PyObject *args, PyObject *kwds)
{
    double now;
    BucketObject *bucket = limiter_find(self, args, kwds, "OO:wait_s", &now);
    if (bucket == NULL)
        return PyErr_Occurred() ? NULL : PyFloat_FromDouble(0.0);
    return bucket_wait_s(bucket, now);
}

static Py_ssize_t
Limiter_length(LimiterObject *self)
{
    return self->table == NULL ? 0 : PyDict_GET_SIZE(self->table);
}

static PyMethodDef Limiter_methods[] = {
    {"allow", (PyCFunction)(void (*)(void))Limiter_allow, METH_VARARGS | METH_KEYWORDS,
     "Take one of source's tokens at now: whether it had one."},
    {"ready", (PyCFunction)(void (*)(void))Limiter_ready, METH_VARARGS | METH_KEYWORDS,
     "Whether source has a token now (nothing is taken; unknown sources have one)."},
    {"wait_s", (PyCFunction)(void (*)(void))Limiter_wait_s, METH_VARARGS | METH_KEYWORDS,
     "Seconds until source has a token again (0 when it has one now)."},
    {NULL},
};

static PyMemberDef Limiter_members[] = {
    {"rate", T_DOUBLE, offsetof(LimiterObject, rate), 0, "Each source's tokens per second."},
    {"burst", T_DOUBLE, offsetof(LimiterObject, burst), 0, "Each source's most tokens."},
    {"limit", T_PYSSIZET, offsetof(LimiterObject, limit), 0, "The most sources remembered."},
    {"limited", T_PYSSIZET, offsetof(LimiterObject, limited), 0,
     "Sources whose last event was refused."},
    {NULL},
};

static PySequenceMethods Limiter_as_sequence = {
    .sq_length = (lenfunc)Limiter_length,
};

static PyTypeObject LimiterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wirekit_udp._hot.SourceLimiter",
    .tp_doc = "SourceLimiter(rate, burst, limit): one token bucket per source in a table of at "
              "most limit, the least recently seen forgotten first "
              "(wirekit_servicekit.ratelimit.SourceLimiter in C).",
    .tp_basicsize = sizeof(LimiterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Limiter_init,
    .tp_dealloc = (destructor)Limiter_dealloc,
    .tp_traverse = (traverseproc)Limiter_traverse,
    .tp_clear = (inquiry)Limiter_clear,
    .tp_methods = Limiter_methods,
    .tp_members = Limiter_members,
    .tp_as_sequence = &Limiter_as_sequence,
};

/* -- The loop key: what the loop guard remembers of an answer -------------------------------- *
 *
 * The pure build's key is hash((addr, data)): SipHash-1-3 over every byte of the payload,
 * ~3 instructions a byte (3,000 of a 1 KiB datagram's ~14,000 in this build). Here the payload
 * is first compressed by NH, the hash of UMAC (RFC 4418; Black, Halevi, Krawczyk, Krovetz and
 * Rogaway, "UMAC: Fast and Secure Message Authentication", CRYPTO '99): each 1 KiB block of
 * it, as 64-bit words m[0..127] (the last block padded with zeros), becomes
 *
 *     sum over i of (m[2i] + K[2i] mod 2^64) * (m[2i+1] + K[2i+1] mod 2^64)   mod 2^128,
 *
 * one multiplication per 16 bytes (~0.6 instructions a byte). K is 1 KiB drawn from
 * os.urandom when the module loads. For any two different blocks of the same length, the
 * chance over K that their sums are equal is at most 2^-64 (NH is 2^-w-almost-universal on
 * equal-length strings, w = 64), and nothing of K or of a sum leaves the process: a sender
 * cannot aim collisions. The key is then SipHash-1-3, under a 128-bit key also drawn when the
 * module loads, of the words [hash(addr), len(data), each block's sum (two words)]: the length
 * tells apart payloads that differ only by trailing zeros, and hash(addr) is the pure build's
 * (Python's own seeded hash). Two different (addr, data) share a key with a chance of about
 * 2^-63 (NH's 2^-64, then SipHash's 64 bits), as in the pure build ~2^-64; a collision would
 * drop one datagram (see LoopGuard). */

#if defined(__SIZEOF_INT128__)
#define NH_BLOCK 1024 /* bytes of payload per sum; the key K is as long */
static uint64_t nh_key[NH_BLOCK / 8];
static uint64_t sip_k0, sip_k1;

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                              \
    do {                                                                                      \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                             \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                                \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                                \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                             \
    } while (0)
#define SIP_ABSORB(m)                                                                         \
    do {                                                                                      \
        uint64_t m_ = (m);                                                                    \
        v3 ^= m_; SIPROUND; v0 ^= m_; words++;                                                \
    } while (0)

static inline uint64_t
load64(const unsigned char *p)
{
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

/* NH of one block of len (1..NH_BLOCK) bytes. */
static inline unsigned __int128
nh_block(const unsigned char *p, size_t len)
{
    unsigned __int128 sum = 0, sum2 = 0; /* two sums: two multiplications in flight */
    const uint64_t *k = nh_key;
    const unsigned char *end = p + (len & ~(size_t)31);
    for (; p < end; p += 32, k += 4) {
        sum += (unsigned __int128)(load64(p) + k[0]) * (load64(p + 8) + k[1]);
        sum2 += (unsigned __int128)(load64(p + 16) + k[2]) * (load64(p + 24) + k[3]);
    }
    if (len & 16) {
        sum += (unsigned __int128)(load64(p) + k[0]) * (load64(p + 8) + k[1]);
        p += 16, k += 2;
    }
    if (len % 16) {
        unsigned char tail[16] = {0};
        memcpy(tail, p, len % 16);
        sum += (unsigned __int128)(load64(tail) + k[0]) * (load64(tail + 8) + k[1]);
    }
    return sum + sum2;
}

static uint64_t
loop_key_of(uint64_t addr_hash, const unsigned char *p, Py_ssize_t n)
{
    uint64_t v0 = sip_k0 ^ 0x736f6d6570736575ULL, v1 = sip_k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = sip_k0 ^ 0x6c7967656e657261ULL, v3 = sip_k1 ^ 0x7465646279746573ULL;
    uint64_t words = 0;
    SIP_ABSORB(addr_hash);
    SIP_ABSORB((uint64_t)n);
    for (Py_ssize_t at = 0; at < n; at += NH_BLOCK) {
        unsigned __int128 sum = nh_block(p + at, (size_t)(n - at < NH_BLOCK ? n - at : NH_BLOCK));
        SIP_ABSORB((uint64_t)sum);
        SIP_ABSORB((uint64_t)(sum >> 64));
    }
    uint64_t b = words << 59; /* SipHash's final word: the input's length (8 bytes a word) */
    v3 ^= b; SIPROUND; v0 ^= b;
    v2 ^= 0xff;
    SIPROUND; SIPROUND; SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static int
loop_key_init(void)
{
    static int drawn; /* once per process: a module set up again (a subinterpreter, an import
                       * after del sys.modules[...]) must not orphan the tables keyed so far */
    if (drawn)
        return 0;
    PyObject *os = PyImport_ImportModule("os");
    if (os == NULL)
        return -1;
    PyObject *bytes = PyObject_CallMethod(os, "urandom", "n", (Py_ssize_t)(sizeof nh_key + 16));
    Py_DECREF(os);
    if (bytes == NULL)
        return -1;
    if (!PyBytes_Check(bytes) || PyBytes_GET_SIZE(bytes) != (Py_ssize_t)(sizeof nh_key + 16)) {
        Py_DECREF(bytes);
        PyErr_SetString(PyExc_RuntimeError, "os.urandom gave the wrong number of bytes");
        return -1;
    }
    const unsigned char *r = (const unsigned char *)PyBytes_AS_STRING(bytes);
    memcpy(nh_key, r, sizeof nh_key);
    sip_k0 = load64(r + sizeof nh_key);
    sip_k1 = load64(r + sizeof nh_key + 8);
    Py_DECREF(bytes);
    drawn = 1;
    return 0;
}
#else
static int
loop_key_init(void)
{
    return 0;
}
#endif

/* The loop guard's key of an answer of data to addr, into *key. Where the compiler has no
 * 128-bit integers, or data is not bytes (or a subclass of bytes), it is the pure build's
 * hash((addr, data)); transports hand over bytes. Never -1 (as Python's hash() never is): the
 * loop table's free slots are marked with it. */
static int
loop_key_of_pair(PyObject *data, PyObject *addr, int64_t *key)
{
#if defined(__SIZEOF_INT128__)
    if (PyBytes_Check(data)) {
        Py_hash_t addr_hash = PyObject_Hash(addr);
        if (addr_hash == -1)
            return -1;
        int64_t k = (int64_t)loop_key_of((uint64_t)addr_hash,
                                         (const unsigned char *)PyBytes_AS_STRING(data),
                                         PyBytes_GET_SIZE(data));
        *key = k == -1 ? -2 : k;
        return 0;
    }
#endif
    PyObject *pair = PyTuple_Pack(2, addr, data);
    if (pair == NULL)
        return -1;
    Py_hash_t hash = PyObject_Hash(pair);
    Py_DECREF(pair);
    if (hash == -1)
        return -1;
    *key = (int64_t)hash;
    return 0;
}

static PyObject *
loop_key(PyObject *data, PyObject *addr)
{
    int64_t key;
    return loop_key_of_pair(data, addr, &key) < 0 ? NULL : PyLong_FromLongLong((long long)key);
}

static PyObject *
hot_loop_key(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "loop_key() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    return loop_key(args[0], args[1]);
}

/* -- LoopTable: the loop guard's table, loop key -> when answered -------------------------- */

/* The pure build's is a dict of int -> float: on the per-datagram path that is an int and a
 * float object made, hashed and kept for each answer. Here a key is an int64 and a time a
 * double, in open addressing (linear probing, at most half full, deletion by backward shift).
 * The keys are a keyed hash already; Fibonacci hashing spreads any others (the tests' small
 * ints) over the slots. A dict's interface, as much of it as LoopGuard and the tests use. */

#define LOOP_FREE ((int64_t)-1)
#define LOOP_MIN_BITS 3

typedef struct {
    PyObject_HEAD
    int64_t *keys; /* LOOP_FREE: a free slot */
    double *whens;
    Py_ssize_t mask; /* slots - 1; slots is 2 ** bits */
    int shift;       /* 64 - bits */
    Py_ssize_t used;
} TableObject;

static PyTypeObject TableType;

static inline Py_ssize_t
table_home(const TableObject *t, int64_t key)
{
    return (Py_ssize_t)(((uint64_t)key * 0x9E3779B97F4A7C15ULL) >> t->shift);
}

/* The slot holding key, or the free slot where it would go. */
static inline Py_ssize_t
table_find(const TableObject *t, int64_t key)
{
    Py_ssize_t i = table_home(t, key);
    while (t->keys[i] != key && t->keys[i] != LOOP_FREE)
        i = (i + 1) & t->mask;
    return i;
}

static int
table_alloc(TableObject *t, int bits)
{
    size_t slots = (size_t)1 << bits;
    int64_t *keys = PyMem_Malloc(slots * sizeof *keys);
    double *whens = PyMem_Malloc(slots * sizeof *whens);
    if (keys == NULL || whens == NULL) {
        PyMem_Free(keys);
        PyMem_Free(whens);
        PyErr_NoMemory();
        return -1;
    }
    memset(keys, 0xff, slots * sizeof *keys); /* every key LOOP_FREE */
    t->keys = keys;
    t->whens = whens;
    t->mask = (Py_ssize_t)slots - 1;
    t->shift = 64 - bits;
    t->used = 0;
    return 0;
}

static int
table_put(TableObject *t, int64_t key, double when)
{
    if ((t->used + 1) * 2 > t->mask + 1) { /* more than half full: twice the slots */
        int64_t *keys = t->keys;
        double *whens = t->whens;
        Py_ssize_t slots = t->mask + 1, used = t->used;
        if (table_alloc(t, 64 - t->shift + 1) < 0)
            return -1;
        for (Py_ssize_t j = 0; j < slots; j++) {
            if (keys[j] != LOOP_FREE) {
                Py_ssize_t i = table_find(t, keys[j]);
                t->keys[i] = keys[j];
                t->whens[i] = whens[j];
            }
        }
        t->used = used;
        PyMem_Free(keys);
        PyMem_Free(whens);
    }
    Py_ssize_t i = table_find(t, key);
    if (t->keys[i] == LOOP_FREE) {
        t->keys[i] = key;
        t->used++;
    }
    t->whens[i] = when;
    return 0;
}

/* Free slot i; the entries after it that probed past it move back (none is left unreachable). */
static void
table_remove_at(TableObject *t, Py_ssize_t i)
{
    for (Py_ssize_t j = (i + 1) & t->mask; t->keys[j] != LOOP_FREE; j = (j + 1) & t->mask) {
        /* the entry at j may fill slot i if its home is not within (i, j] */
        if (((j - table_home(t, t->keys[j])) & t->mask) >= ((j - i) & t->mask)) {
            t->keys[i] = t->keys[j];
            t->whens[i] = t->whens[j];
            i = j;
        }
    }
    t->keys[i] = LOOP_FREE;
    t->used--;
}

/* A Python key as the table's: 1, or 0 when no loop key can be it (not found, not stored). */
static int
table_key(PyObject *o, int64_t *key)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "loop keys are ints, not %s", Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow;
    long long k = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (k == -1 && PyErr_Occurred())
        return -1;
    *key = (int64_t)k;
    return !overflow && k != -1;
}

static PyObject *
Table_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "LoopTable() takes no arguments");
        return NULL;
    }
    TableObject *self = (TableObject *)type->tp_alloc(type, 0);
    if (self != NULL && table_alloc(self, LOOP_MIN_BITS) < 0)
        Py_CLEAR(self);
    return (PyObject *)self;
}

static void
Table_dealloc(TableObject *self)
{
    PyMem_Free(self->keys);
    PyMem_Free(self->whens);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t
Table_length(TableObject *self)
{
    return self->used;
}

/* The slot of a Python key, or -1 (an error set when there is one). */
static Py_ssize_t
Table_slot(TableObject *self, PyObject *o)
{
    int64_t key;
    int ok = table_key(o, &key);
    if (ok <= 0)
        return -1;
    Py_ssize_t i = table_find(self, key);
    return self->keys[i] == key ? i : -1;
}

static PyObject *
Table_subscript(TableObject *self, PyObject *o)
{
    Py_ssize_t i = Table_slot(self, o);
    if (i < 0) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, o);
        return NULL;
    }
    return PyFloat_FromDouble(self->whens[i]);
}

static int
Table_ass_subscript(TableObject *self, PyObject *o, PyObject *value)
{
    if (value == NULL) {
        Py_ssize_t i = Table_slot(self, o);
        if (i < 0) {
            if (!PyErr_Occurred())
                PyErr_SetObject(PyExc_KeyError, o);
            return -1;
        }
        table_remove_at(self, i);
        return 0;
    }
    int64_t key;
    double when;
    int ok = table_key(o, &key);
    if (ok < 0 || as_double(value, &when) < 0)
        return -1;
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%R is not a loop key (an int64 other than -1)", o);
        return -1;
    }
    return table_put(self, key, when);
}

static int
Table_contains(TableObject *self, PyObject *o)
{
    Py_ssize_t i = Table_slot(self, o);
    return i >= 0 ? 1 : PyErr_Occurred() ? -1 : 0;
}

static PyObject *
Table_get(TableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "get() takes 1 or 2 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t i = Table_slot(self, args[0]);
    if (i >= 0)
        return PyFloat_FromDouble(self->whens[i]);
    if (PyErr_Occurred())
        return NULL;
    return Py_NewRef(nargs == 2 ? args[1] : Py_None);
}

static PyObject *
Table_items(TableObject *self, PyObject *unused)
{
    PyObject *items = PyList_New(self->used);
    if (items == NULL)
        return NULL;
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i <= self->mask; i++) {
        if (self->keys[i] == LOOP_FREE)
            continue;
        PyObject *item = Py_BuildValue("(Ld)", (long long)self->keys[i], self->whens[i]);
        if (item == NULL) {
            Py_DECREF(items);
            return NULL;
        }
        PyList_SET_ITEM(items, n++, item);
    }
    return items;
}

static PyObject *
Table_clear(TableObject *self, PyObject *unused)
{
    memset(self->keys, 0xff, (size_t)(self->mask + 1) * sizeof *self->keys);
    self->used = 0;
    Py_RETURN_NONE;
}

static PyMethodDef Table_methods[] = {
    {"get", (PyCFunction)(void (*)(void))Table_get, METH_FASTCALL,
     "get(key, default=None): when key was answered, or default."},
    {"items", (PyCFunction)Table_items, METH_NOARGS, "A list of (key, when) pairs."},
    {"clear", (PyCFunction)Table_clear, METH_NOARGS, "Forget every answer."},
    {NULL},
};

static PyMappingMethods Table_as_mapping = {
    .mp_length = (lenfunc)Table_length,
    .mp_subscript = (binaryfunc)Table_subscript,
    .mp_ass_subscript = (objobjargproc)Table_ass_subscript,
};

static PySequenceMethods Table_as_sequence = {
    .sq_contains = (objobjproc)Table_contains,
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wirekit_udp._hot.LoopTable",
    .tp_doc = "LoopTable(): the loop guard's table, loop key (int) -> when answered (float).",
    .tp_basicsize = sizeof(TableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Table_new,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_methods = Table_methods,
    .tp_as_mapping = &Table_as_mapping,
    .tp_as_sequence = &Table_as_sequence,
};

/* -- Core: the state of the endpoint that its datagrams touch --------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *ctx;
    PyObject *transport;
    PyObject *sendto;
    PyObject *time;          /* ctx.clock */
    PyObject *loop;          /* the LoopGuard */
    TableObject *answers;    /* its table: loop_key(data, addr) -> when answered */
    PyObject *unicast;       /* set: hosts judged unicast */
    PyObject *deny_ports;    /* set or frozenset */
    LimiterObject *limiter;
    BucketObject *global_bucket;
    CellObject *received, *received_bytes;
    double window;
    Py_ssize_t remember;
    Py_ssize_t max_size;
    long min_port;
    char sends_empty;
    char ipv4;
    char monotonic; /* the clock is time.monotonic: read here, no call, no float made */
} CoreObject;

static int
Core_traverse(CoreObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->ctx);
    Py_VISIT(self->transport);
    Py_VISIT(self->sendto);
    Py_VISIT(self->time);
    Py_VISIT(self->loop);
    Py_VISIT(self->answers);
    Py_VISIT(self->unicast);
    Py_VISIT(self->deny_ports);
    Py_VISIT(self->limiter);
    Py_VISIT(self->global_bucket);
    Py_VISIT(self->received);
    Py_VISIT(self->received_bytes);
    return 0;
}

static int
Core_clear(CoreObject *self)
{
    Py_CLEAR(self->ctx);
    Py_CLEAR(self->transport);
    Py_CLEAR(self->sendto);
    Py_CLEAR(self->time);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->answers);
    Py_CLEAR(self->unicast);
    Py_CLEAR(self->deny_ports);
    Py_CLEAR(self->limiter);
    Py_CLEAR(self->global_bucket);
    Py_CLEAR(self->received);
    Py_CLEAR(self->received_bytes);
    return 0;
}

static void
Core_dealloc(CoreObject *self)
{
    PyObject_GC_UnTrack(self);
    Core_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    CoreObject *self = (CoreObject *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->transport = Py_NewRef(Py_None);
    return (PyObject *)self;
}

/* owner.<name>, checked to be of the C type when one is given. */
static int
take(PyObject *owner, const char *name, PyTypeObject *type, PyObject **slot)
{
    PyObject *value = PyObject_GetAttrString(owner, name);
    if (value == NULL)
        return -1;
    if (type != NULL && !PyObject_TypeCheck(value, type)) {
        PyErr_Format(PyExc_TypeError, "%s must be a %s, not %s", name, type->tp_name,
                     Py_TYPE(value)->tp_name);
        Py_DECREF(value);
        return -1;
    }
    Py_XSETREF(*slot, value);
    return 0;
}

static int
take_number(PyObject *owner, const char *name, double *d, Py_ssize_t *n)
{
    PyObject *value = PyObject_GetAttrString(owner, name);
    if (value == NULL)
        return -1;
    int status = 0;
    if (d != NULL)
        status = as_double(value, d);
    else if ((*n = PyLong_AsSsize_t(value)) == -1 && PyErr_Occurred())
        status = -1;
    Py_DECREF(value);
    return status;
}

static int
Core_init(CoreObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ctx", NULL};
    PyObject *ctx, *metrics = NULL;
    Py_ssize_t max_size, min_port, remember;
    double window;
    int status = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Core", kwlist, &ctx))
        return -1;
    if (take(ctx, "limiter", &LimiterType, (PyObject **)&self->limiter) < 0
        || limiter_ready(self->limiter) < 0
        || take(ctx, "global_bucket", &BucketType, (PyObject **)&self->global_bucket) < 0
        || take(ctx, "loop", NULL, &self->loop) < 0
        || take(self->loop, "answers", &TableType, (PyObject **)&self->answers) < 0
        || take_number(self->loop, "window_s", &window, NULL) < 0
        || take_number(self->loop, "limit", NULL, &remember) < 0
        || take(ctx, "clock", NULL, &self->time) < 0
        || take(ctx, "deny_ports", NULL, &self->deny_ports) < 0
        || take_number(ctx, "max_size", NULL, &max_size) < 0
        || take_number(ctx, "min_port", NULL, &min_port) < 0
        || take(ctx, "metrics", NULL, &metrics) < 0
        || take(metrics, "received", &CellType, (PyObject **)&self->received) < 0
        || take(metrics, "received_bytes", &CellType, (PyObject **)&self->received_bytes) < 0)
        goto done;
    if (!PyAnySet_Check(self->deny_ports)) {
        PyErr_Format(PyExc_TypeError, "deny_ports must be a set or frozenset, not %s",
                     Py_TYPE(self->deny_ports)->tp_name);
        goto done;
    }
    PyObject *unicast = PySet_New(NULL);
    if (unicast == NULL)
        goto done;
    Py_XSETREF(self->unicast, unicast);
    Py_XSETREF(self->sendto, NULL); /* connection_made sets it */
    Py_INCREF(ctx);
    Py_XSETREF(self->ctx, ctx);
    self->window = window;
    self->remember = remember;
    self->max_size = max_size;
    self->min_port = (long)min_port;
    self->sends_empty = 0;
    self->ipv4 = 0;
#if defined(__linux__) /* where time.monotonic reads CLOCK_MONOTONIC (not macOS, say) */
    self->monotonic = self->time == monotonic;
#else
    self->monotonic = 0;
#endif
    status = 0;
done:
    Py_XDECREF(metrics);
    return status;
}

static inline PyObject *
call_method(PyObject *self, PyObject *name, PyObject *a, PyObject *b, PyObject *c)
{
    PyObject *args[4] = {self, a, b, c};
    size_t nargs = c ? 4 : b ? 3 : 2;
    return PyObject_VectorcallMethod(name, args, nargs | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* self._drop(reason, addr, n) */
static PyObject *
drop(CoreObject *self, PyObject *reason, PyObject *addr, Py_ssize_t n)
{
    PyObject *count = PyLong_FromSsize_t(n);
    if (count == NULL)
        return NULL;
    PyObject *result = call_method((PyObject *)self, str_drop, reason, addr, count);
    Py_DECREF(count);
    if (result == NULL)
        return NULL;
    Py_DECREF(result);
    Py_RETURN_NONE;
}

static PyObject *
Core_datagram_received(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "datagram_received() takes 2 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    PyObject *data = args[0], *addr = args[1];
    PyObject *port = NULL, *host = NULL, *now = NULL, *key = NULL, *sendto = NULL;
    TableObject *answers = NULL; /* held (so is sendto): Python code runs while it is used */
    PyObject *result = NULL;
    if (self->ctx == NULL) { /* set last by __init__ */
        PyErr_SetString(PyExc_RuntimeError, "Core is not initialised");
        return NULL;
    }
    Py_ssize_t n = PyObject_Length(data);
    if (n < 0)
        return NULL;
    /* addr[1], addr[0] */
    if (PyTuple_CheckExact(addr) && PyTuple_GET_SIZE(addr) >= 2) {
        port = Py_NewRef(PyTuple_GET_ITEM(addr, 1));
        host = Py_NewRef(PyTuple_GET_ITEM(addr, 0));
    } else {
        if ((port = PySequence_GetItem(addr, 1)) == NULL)
            return NULL;
    }
    if (n > self->max_size) {
        result = drop(self, reason_oversize, addr, n);
        goto done;
    }
    /* port < self.min_port */
    int low;
    if (PyLong_CheckExact(port)) {
        int overflow;
        long p = PyLong_AsLongAndOverflow(port, &overflow);
        if (p == -1 && PyErr_Occurred())
            goto done;
        low = overflow ? overflow < 0 : p < self->min_port;
    } else {
        PyObject *min_port = PyLong_FromLong(self->min_port);
        if (min_port == NULL)
            goto done;
        low = PyObject_RichCompareBool(port, min_port, Py_LT);
        Py_DECREF(min_port);
        if (low < 0)
            goto done;
    }
    if (low) {
        result = drop(self, reason_privileged_port, addr, n);
        goto done;
    }
    int denied = PySet_Contains(self->deny_ports, port);
    if (denied < 0)
        goto done;
    if (denied) {
        result = drop(self, reason_denied_port, addr, n);
        goto done;
    }
    if (host == NULL && (host = PySequence_GetItem(addr, 0)) == NULL)
        goto done;
    int known = PySet_Contains(self->unicast, host);
    if (known < 0)
        goto done;
    if (!known) {
        PyObject *judged = call_method((PyObject *)self, str_judge, host, NULL, NULL);
        if (judged == NULL)
            goto done;
        int bad = PyObject_IsTrue(judged);
        Py_DECREF(judged);
        if (bad < 0)
            goto done;
        if (bad) {
            result = drop(self, reason_broadcast_multicast, addr, n);
            goto done;
        }
    }
    double t;
#if defined(__linux__)
    if (self->monotonic) { /* what time.monotonic() returns, read as it reads it */
        struct timespec ts;
        if (clock_gettime(CLOCK_MONOTONIC, &ts) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        t = (double)((int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec) / 1e9;
    } else
#endif
    {
        if ((now = PyObject_CallNoArgs(self->time)) == NULL || as_double(now, &t) < 0)
            goto done;
    }
    /* LoopGuard.key and .reflected */
    int64_t k;
    if (loop_key_of_pair(data, addr, &k) < 0)
        goto done;
    answers = (TableObject *)Py_NewRef(self->answers);
    Py_ssize_t slot = table_find(answers, k);
    if (answers->keys[slot] == k && t - answers->whens[slot] < self->window) {
        result = drop(self, reason_loop, addr, n);
        goto done;
    }
    /* self.global_bucket.take(now), as the pure build inlines it */
    BucketObject *bucket = self->global_bucket;
    double tokens = bucket->tokens + (t - bucket->stamp) * bucket->rate;
    if (tokens > bucket->burst)
        tokens = bucket->burst;
    bucket->stamp = t;
    if (tokens < 1.0) {
        bucket->tokens = tokens;
        result = drop(self, reason_rate_limit_global, addr, n);
        goto done;
    }
    bucket->tokens = tokens - 1.0;
    /* self.limiter.allow(host if self._ipv4 else source_key(host), now) */
    int allowed;
    if (self->ipv4) {
        allowed = limiter_allow(self->limiter, host, t);
    } else {
        PyObject *source = PyObject_CallOneArg(source_key, host);
        if (source == NULL)
            goto done;
        allowed = limiter_allow(self->limiter, source, t);
        Py_DECREF(source);
    }
    if (allowed < 0)
        goto done;
    if (!allowed) {
        result = drop(self, reason_rate_limit_source, addr, n);
        goto done;
    }
    PyObject *sent;
    if (n || self->sends_empty) {
        if (self->sendto == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "datagram_received before connection_made");
            goto done;
        }
        sendto = Py_NewRef(self->sendto);
        PyObject *send_args[2] = {data, addr};
        sent = PyObject_Vectorcall(sendto, send_args, 2, NULL);
    } else {
        sent = call_method((PyObject *)self, str_send_empty, addr, NULL, NULL);
    }
    if (sent == NULL)
        goto done;
    Py_DECREF(sent);
    /* LoopGuard.answered */
    if (answers->used < self->remember) {
        if (table_put(answers, k, t) < 0)
            goto done;
    } else {
        if ((key = PyLong_FromLongLong((long long)k)) == NULL
            || (now == NULL && (now = PyFloat_FromDouble(t)) == NULL))
            goto done;
        PyObject *done_ = call_method(self->loop, str_answered, key, now, NULL);
        if (done_ == NULL)
            goto done;
        Py_DECREF(done_);
    }
    self->received->n += 1; /* after its fate: see protocol.Answered */
    self->received_bytes->n += n;
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(port);
    Py_XDECREF(host);
    Py_XDECREF(now);
    Py_XDECREF(key);
    Py_XDECREF(answers);
    Py_XDECREF(sendto);
    return result;
}

static PyMethodDef Core_methods[] = {
    {"datagram_received", (PyCFunction)(void (*)(void))Core_datagram_received, METH_FASTCALL,
     "UdpEcho.datagram_received: the defences, then the same bytes back to addr."},
    {NULL},
};

static PyMemberDef Core_members[] = {
    {"ctx", T_OBJECT, offsetof(CoreObject, ctx), READONLY, "The endpoint's UdpContext."},
    {"transport", T_OBJECT, offsetof(CoreObject, transport), 0, "The transport, once made."},
    {"_sendto", T_OBJECT, offsetof(CoreObject, sendto), 0, "The transport's sendto."},
    {"_time", T_OBJECT, offsetof(CoreObject, time), READONLY, "ctx.clock."},
    {"loop", T_OBJECT, offsetof(CoreObject, loop), READONLY, "The LoopGuard."},
    {"_answers", T_OBJECT, offsetof(CoreObject, answers), READONLY, "The LoopGuard's table."},
    {"_unicast", T_OBJECT, offsetof(CoreObject, unicast), READONLY,
     "Sources judged not broadcast or multicast."},
    {"deny_ports", T_OBJECT, offsetof(CoreObject, deny_ports), READONLY, "Ports not answered."},
    {"limiter", T_OBJECT, offsetof(CoreObject, limiter), READONLY, "The per-source limiter."},
    {"global_bucket", T_OBJECT, offsetof(CoreObject, global_bucket), READONLY,
     "The global token bucket."},
    {"_received", T_OBJECT, offsetof(CoreObject, received), READONLY, "Datagrams received."},
    {"_received_bytes", T_OBJECT, offsetof(CoreObject, received_bytes), READONLY,
     "Bytes received."},
    {"_window", T_DOUBLE, offsetof(CoreObject, window), READONLY, "The loop window."},
    {"_remember", T_PYSSIZET, offsetof(CoreObject, remember), READONLY,
     "The most answers the loop guard remembers."},
    {"max_size", T_PYSSIZET, offsetof(CoreObject, max_size), 0, "The largest datagram."},
    {"min_port", T_LONG, offsetof(CoreObject, min_port), 0, "The lowest source port answered."},
    {"sends_empty", T_BOOL, offsetof(CoreObject, sends_empty), 0,
     "The transport sends empty datagrams itself."},
    {"_ipv4", T_BOOL, offsetof(CoreObject, ipv4), 0,
     "An IPv4 socket: every source is its own rate-limit key."},
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wirekit_udp._hot.Core",
    .tp_doc = "Core(ctx): the state of the udp endpoint that its datagrams touch.",
    .tp_basicsize = sizeof(CoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = Core_new,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_methods = Core_methods,
    .tp_members = Core_members,
};

/* -- DatagramIO: the endpoint's socket, read and written here ------------------------------- */

/* uvloop's datagram transport (libuv's) costs more per datagram than wirekit's defences do: a
 * source address made into a string with inet_ntop (glibc's sprintf: ~1,400 instructions), the
 * answer's address looked up in an LRU cache of tuples by equality, a bound method made to call
 * datagram_received, a recvmsg that finds the socket empty after each batch. Here, on the
 * loop's add_reader:
 * - recvmmsg takes up to IO_BATCH datagrams in one call, until the socket is empty or
 *   IO_ROUNDS calls were made (then the loop gets its turn);
 * - a source address becomes its (host, port[, flowinfo, scope_id]) tuple once, then comes from
 *   a direct-mapped cache (the same tuple object: its host's hash is cached too);
 * - datagram_received is Core's C function, called directly (a protocol that overrides it is
 *   called as any object);
 * - an answer leaves at once (sendmsg), to the source's address as received (the tuple it was
 *   given is recognised by identity), from the address it came to when the socket is a
 *   wildcard bind (IP_PKTINFO / IPV6_PKTINFO).
 * Answers are not held back to leave together in one sendmmsg: in a closed loop an answer
 * held back is a client waiting, and a server that then finds its socket empty and sleeps
 * (measured: more CPU per datagram in the kernel, going to sleep and waking, than the calls
 * saved). A send the kernel cannot take (a full buffer, an unreachable address) is reported
 * to the protocol's error_received, as asyncio's transports do; UDP answers are not retried. */

#if defined(__linux__)
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <errno.h>

#define IO_BATCH 16
#define IO_ROUNDS 4 /* batches per readiness callback (64 datagrams) before the loop's turn */
#define IO_CACHE 256

typedef union {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
} SockAddr;

typedef union { /* room for either control message, aligned as one */
    char buf[CMSG_SPACE(sizeof(struct in6_pktinfo)) + CMSG_SPACE(sizeof(struct in_pktinfo))];
    struct cmsghdr align;
} Control;

typedef struct {
    SockAddr addr;
    socklen_t len;
    PyObject *tuple; /* owned; NULL: a free slot */
} CachedAddr;

typedef struct {
    PyObject_HEAD
    PyObject *sock; /* held: its fd stays this socket's while the loop may call read() */
    int fd;
    int family;
    char pktinfo;  /* a wildcard bind: answer from the address each datagram came to */
    char closing;
    char reading; /* in read(): a call from its own datagram_received returns at once */
    char direct;  /* the protocol is a Core with Core's datagram_received */
    Py_ssize_t size;
    PyObject *protocol;
    unsigned char *bufs; /* IO_BATCH * size */
    struct mmsghdr in[IO_BATCH];
    struct iovec iov[IO_BATCH];
    SockAddr names[IO_BATCH];
    Control controls[IO_BATCH];
    int current;      /* the datagram being handled (an index of in[]), or -1 */
    PyObject *source; /* its address tuple (borrowed from the cache) */
    Control reply;    /* the control message its answer leaves with */
    size_t replylen;
    CachedAddr *cache; /* IO_CACHE slots */
} IOObject;

static PyTypeObject IOType;
static PyObject *str_datagram_received, *str_error_received;

static int
IO_traverse(IOObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->protocol);
    Py_VISIT(self->sock);
    return 0;
}

static void
io_forget(IOObject *self)
{
    if (self->cache != NULL)
        for (int i = 0; i < IO_CACHE; i++)
            Py_CLEAR(self->cache[i].tuple);
    self->source = NULL;
}

static int
IO_clear(IOObject *self)
{
    io_forget(self);
    Py_CLEAR(self->protocol);
    Py_CLEAR(self->sock);
    return 0;
}

static void
IO_dealloc(IOObject *self)
{
    PyObject_GC_UnTrack(self);
    IO_clear(self);
    PyMem_Free(self->bufs);
    PyMem_Free(self->cache);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
IO_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"sock", "protocol", "size", "pktinfo", NULL};
    int pktinfo;
    Py_ssize_t size;
    PyObject *sock, *protocol;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOnp:DatagramIO", kwlist, &sock, &protocol,
                                     &size, &pktinfo))
        return NULL;
    int fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0)
        return NULL;
    PyObject *family_obj = PyObject_GetAttrString(sock, "family");
    if (family_obj == NULL)
        return NULL;
    long family = PyLong_AsLong(family_obj);
    Py_DECREF(family_obj);
    if (family == -1 && PyErr_Occurred())
        return NULL;
    if (family != AF_INET && family != AF_INET6) {
        PyErr_Format(PyExc_ValueError, "family must be AF_INET or AF_INET6, not %ld", family);
        return NULL;
    }
    if (size < 1 || size > 65536) {
        PyErr_Format(PyExc_ValueError, "size must be 1 to 65536, not %zd", size);
        return NULL;
    }
    IOObject *self = (IOObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->sock = Py_NewRef(sock);
    self->fd = fd;
    self->family = (int)family;
    self->pktinfo = (char)pktinfo;
    self->size = size;
    self->current = -1;
    self->protocol = Py_NewRef(protocol);
    self->bufs = PyMem_Malloc((size_t)size * IO_BATCH);
    self->cache = PyMem_Calloc(IO_CACHE, sizeof *self->cache);
    if (self->bufs == NULL || self->cache == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < IO_BATCH; i++) {
        self->iov[i].iov_base = self->bufs + (size_t)size * i;
        self->iov[i].iov_len = (size_t)size;
    }
    /* Called in C when protocol.datagram_received is Core's, bound to it, as looked up now
     * (an override set on the instance or its class later is not seen) */
    PyObject *method = PyObject_GetAttr(protocol, str_datagram_received);
    if (method == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->direct = PyObject_TypeCheck(protocol, &CoreType) && PyCFunction_Check(method)
                   && PyCFunction_GET_FUNCTION(method) == (PyCFunction)(void (*)(void))
                                                              Core_datagram_received
                   && PyCFunction_GET_SELF(method) == protocol;
    Py_DECREF(method);
    return (PyObject *)self;
}

/* The (host, port[, flowinfo, scope_id]) tuple of a source address, as Python's socket module
 * makes it: a new reference. */
static PyObject *
addr_tuple(const SockAddr *a)
{
    char host[INET6_ADDRSTRLEN];
    if (a->sa.sa_family == AF_INET) {
        if (inet_ntop(AF_INET, &a->in.sin_addr, host, sizeof host) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, (int)ntohs(a->in.sin_port));
    }
    if (a->sa.sa_family == AF_INET6) {
        if (inet_ntop(AF_INET6, &a->in6.sin6_addr, host, sizeof host) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", host, (int)ntohs(a->in6.sin6_port),
                             (unsigned int)ntohl(a->in6.sin6_flowinfo),
                             (unsigned int)a->in6.sin6_scope_id);
    }
    PyErr_Format(PyExc_OSError, "a datagram from an address of family %d", a->sa.sa_family);
    return NULL;
}

/* The cached tuple of a source address (borrowed; it lives until its slot is taken). */
static PyObject *
io_source(IOObject *self, const SockAddr *a, socklen_t len)
{
    uint64_t h = 0;
    if (a->sa.sa_family == AF_INET) {
        len = sizeof a->in;
        h = ((uint64_t)a->in.sin_addr.s_addr << 16) ^ a->in.sin_port;
    } else if (a->sa.sa_family == AF_INET6) {
        len = sizeof a->in6;
        uint64_t w[2];
        memcpy(w, &a->in6.sin6_addr, 16);
        h = w[0] ^ w[1] ^ a->in6.sin6_port ^ ((uint64_t)a->in6.sin6_scope_id << 32)
            ^ ((uint64_t)a->in6.sin6_flowinfo << 20);
    }
    CachedAddr *slot = &self->cache[(h * 0x9E3779B97F4A7C15ULL) >> (64 - 8)];
    if (slot->tuple != NULL && slot->len == len && memcmp(&slot->addr, a, len) == 0)
        return slot->tuple;
    PyObject *tuple = addr_tuple(a);
    if (tuple == NULL)
        return NULL;
    Py_XSETREF(slot->tuple, tuple);
    memcpy(&slot->addr, a, len);
    slot->len = len;
    return tuple;
}

/* The control message that makes an answer leave from where datagram i came to. */
static void
io_reply_from(IOObject *self, struct msghdr *msg)
{
    self->replylen = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        struct cmsghdr *r = (struct cmsghdr *)self->reply.buf;
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO
            && c->cmsg_len >= CMSG_LEN(sizeof(struct in_pktinfo))) {
            struct in_pktinfo got, answer = {0};
            memcpy(&got, CMSG_DATA(c), sizeof got);
            answer.ipi_spec_dst = got.ipi_addr;
            r->cmsg_level = IPPROTO_IP;
            r->cmsg_type = IP_PKTINFO;
            r->cmsg_len = CMSG_LEN(sizeof answer);
            memcpy(CMSG_DATA(r), &answer, sizeof answer);
            self->replylen = CMSG_SPACE(sizeof answer);
            return;
        }
        if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO
            && c->cmsg_len >= CMSG_LEN(sizeof(struct in6_pktinfo))) {
            struct in6_pktinfo got, answer = {0};
            memcpy(&got, CMSG_DATA(c), sizeof got);
            answer.ipi6_addr = got.ipi6_addr;
            r->cmsg_level = IPPROTO_IPV6;
            r->cmsg_type = IPV6_PKTINFO;
            r->cmsg_len = CMSG_LEN(sizeof answer);
            memcpy(CMSG_DATA(r), &answer, sizeof answer);
            self->replylen = CMSG_SPACE(sizeof answer);
            return;
        }
    }
}

/* An exception taken out of the error indicator (Python 3.11's API), to raise later. */
typedef struct {
    PyObject *type, *value, *traceback;
} Raised;

/* Keep the exception raised if it is the first, or the first that is not an Exception
 * (KeyboardInterrupt, SystemExit: it is the one raised); the other is reported as unraisable.
 * 1 when the one kept is not an Exception: then nothing more is handed over. */
static int
keep_first(Raised *first, PyObject *where)
{
    Raised now;
    PyErr_Fetch(&now.type, &now.value, &now.traceback);
    if (first->type == NULL) {
        *first = now;
    } else if (PyErr_GivenExceptionMatches(first->type, PyExc_Exception)
               && !PyErr_GivenExceptionMatches(now.type, PyExc_Exception)) {
        PyErr_Restore(first->type, first->value, first->traceback);
        PyErr_WriteUnraisable(where);
        *first = now;
    } else {
        PyErr_Restore(now.type, now.value, now.traceback);
        PyErr_WriteUnraisable(where);
    }
    return !PyErr_GivenExceptionMatches(first->type, PyExc_Exception);
}

/* protocol.error_received(OSError(err)); -1 if it raised. */
static int
io_report(IOObject *self, int err)
{
    PyObject *type, *exc, *traceback;
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    PyErr_Fetch(&type, &exc, &traceback);
    PyErr_NormalizeException(&type, &exc, &traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    if (exc == NULL)
        return -1;
    PyObject *args[2] = {self->protocol, exc};
    PyObject *result = PyObject_VectorcallMethod(
        str_error_received, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(exc);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* An address tuple as a socket address, for an answer to an address not just received. */
static int
parse_addr(IOObject *self, PyObject *addr, SockAddr *a, socklen_t *len)
{
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope_id = 0;
    if (!PyTuple_Check(addr)) {
        PyErr_Format(PyExc_TypeError, "an address is a tuple, not %s", Py_TYPE(addr)->tp_name);
        return -1;
    }
    if (self->family == AF_INET) {
        if (!PyArg_ParseTuple(addr, "si:sendto", &host, &port))
            return -1;
    } else if (!PyArg_ParseTuple(addr, "si|II:sendto", &host, &port, &flowinfo, &scope_id)) {
        return -1;
    }
    if (port < 0 || port > 65535) {
        PyErr_Format(PyExc_OverflowError, "port must be 0-65535, not %d", port);
        return -1;
    }
    if (flowinfo > 0xfffff) {
        PyErr_SetString(PyExc_OverflowError, "flowinfo must be 0-1048575");
        return -1;
    }
    memset(a, 0, sizeof *a);
    if (self->family == AF_INET) {
        a->in.sin_family = AF_INET;
        a->in.sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &a->in.sin_addr) != 1)
            goto not_numeric;
        *len = sizeof a->in;
    } else {
        a->in6.sin6_family = AF_INET6;
        a->in6.sin6_port = htons((uint16_t)port);
        a->in6.sin6_flowinfo = htonl(flowinfo);
        a->in6.sin6_scope_id = scope_id;
        if (inet_pton(AF_INET6, host, &a->in6.sin6_addr) != 1)
            goto not_numeric;
        *len = sizeof a->in6;
    }
    return 0;
not_numeric:
    PyErr_Format(PyExc_ValueError, "%R is not a numeric address of this socket's family", addr);
    return -1;
}

static PyObject *
IO_sendto(IOObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "sendto() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *data = args[0], *addr = args[1];
    if (self->closing)
        Py_RETURN_NONE; /* as asyncio's: nothing is sent once the transport is closing */
    SockAddr to;
    struct msghdr m = {0};
    if (addr == self->source && self->current >= 0) {
        m.msg_name = &self->names[self->current];
        m.msg_namelen = self->in[self->current].msg_hdr.msg_namelen;
    } else if (parse_addr(self, addr, &to, &m.msg_namelen) < 0) {
        return NULL;
    } else {
        m.msg_name = &to;
    }
    if (self->current >= 0 && self->replylen) { /* during datagram_received, as pktinfo.py */
        m.msg_control = self->reply.buf;
        m.msg_controllen = self->replylen;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    struct iovec iov = {view.buf, (size_t)view.len};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    ssize_t sent;
    do
        sent = sendmsg(self->fd, &m, MSG_DONTWAIT);
    while (sent < 0 && errno == EINTR);
    int err = errno;
    PyBuffer_Release(&view);
    if (sent < 0 && io_report(self, err) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Hand datagram i to the protocol. */
static PyObject *
io_deliver(IOObject *self, int i)
{
    struct msghdr *msg = &self->in[i].msg_hdr;
    PyObject *addr = io_source(self, &self->names[i], msg->msg_namelen);
    if (addr == NULL)
        return NULL;
    size_t len = self->in[i].msg_len; /* its real length (MSG_TRUNC) */
    if (len > self->iov[i].iov_len && self->direct) /* larger than the largest answered */
        return drop((CoreObject *)self->protocol, reason_oversize, addr, (Py_ssize_t)len);
    size_t copied = len < self->iov[i].iov_len ? len : self->iov[i].iov_len;
    PyObject *data = PyBytes_FromStringAndSize(self->iov[i].iov_base, (Py_ssize_t)copied);
    if (data == NULL)
        return NULL;
    self->current = i;
    self->source = addr;
    if (self->pktinfo)
        io_reply_from(self, msg);
    PyObject *result;
    PyObject *call[3] = {self->protocol, data, addr};
    Py_INCREF(addr); /* a datagram_received that sends elsewhere may evict it from the cache */
    if (self->direct)
        result = Core_datagram_received((CoreObject *)self->protocol, call + 1, 2);
    else
        result = PyObject_VectorcallMethod(str_datagram_received, call,
                                           3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(addr);
    Py_DECREF(data);
    self->current = -1;
    self->source = NULL;
    return result;
}

/* The loop's reader callback: up to IO_ROUNDS batches of up to IO_BATCH datagrams. An
 * Exception of the protocol's stops nothing: the datagrams read are all handed over and
 * answered, then the first is raised (for the loop's exception handler; any later ones are
 * reported as unraisable). A KeyboardInterrupt or SystemExit is raised at once. */
static PyObject *
IO_read(IOObject *self, PyObject *unused)
{
    Raised failed = {NULL, NULL, NULL};
    int stop = 0;
    if (self->reading) /* called from its own datagram_received: the batch is in hand */
        Py_RETURN_NONE;
    Py_INCREF(self); /* the protocol may close the transport and drop the last reference */
    for (int round = 0; round < IO_ROUNDS && !self->closing && !stop; round++) {
        for (int i = 0; i < IO_BATCH; i++) {
            struct msghdr *m = &self->in[i].msg_hdr;
            m->msg_name = &self->names[i];
            m->msg_namelen = sizeof self->names[i];
            m->msg_iov = &self->iov[i];
            m->msg_iovlen = 1;
            m->msg_control = self->pktinfo ? self->controls[i].buf : NULL;
            m->msg_controllen = self->pktinfo ? sizeof self->controls[i].buf : 0;
            m->msg_flags = 0;
        }
        int got = recvmmsg(self->fd, self->in, IO_BATCH, MSG_DONTWAIT | MSG_TRUNC, NULL);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK
                && io_report(self, errno) < 0) /* an ICMP error for an earlier answer */
                (void)keep_first(&failed, self->protocol);
            break;
        }
        self->reading = 1;
        for (int i = 0; i < got && !self->closing && !stop; i++) {
            PyObject *result = io_deliver(self, i);
            if (result != NULL)
                Py_DECREF(result);
            else
                stop = keep_first(&failed, self->protocol);
        }
        self->reading = 0;
        /* On even when this batch was short: answered at once, the clients have often sent
         * again meanwhile (a server that stops here sleeps and wakes more). */
    }
    Py_DECREF(self);
    if (failed.type != NULL) {
        PyErr_Restore(failed.type, failed.value, failed.traceback);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Before the transport closes the socket: nothing more is read or sent. */
static PyObject *
IO_close(IOObject *self, PyObject *unused)
{
    self->closing = 1;
    io_forget(self);
    Py_RETURN_NONE;
}

static PyMethodDef IO_methods[] = {
    {"read", (PyCFunction)IO_read, METH_NOARGS,
     "The loop's reader callback: read, hand over and answer what the socket holds."},
    {"sendto", (PyCFunction)(void (*)(void))IO_sendto, METH_FASTCALL,
     "sendto(data, addr): the transport's sendto."},
    {"close", (PyCFunction)IO_close, METH_NOARGS, "Stop: nothing is read or sent after."},
    {NULL},
};

static PyMemberDef IO_members[] = {
    {"closing", T_BOOL, offsetof(IOObject, closing), READONLY, "close() was called."},
    {"direct", T_BOOL, offsetof(IOObject, direct), READONLY,
     "The protocol's datagram_received is Core's, called in C."},
    {"pktinfo", T_BOOL, offsetof(IOObject, pktinfo), READONLY,
     "Answers leave from the address each datagram came to."},
    {NULL},
};

static PyTypeObject IOType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wirekit_udp._hot.DatagramIO",
    .tp_doc = "DatagramIO(fd, family, protocol, size, pktinfo): a datagram socket's reads "
              "and answers, for the transport of pktinfo.py.",
    .tp_basicsize = sizeof(IOObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = IO_new,
    .tp_dealloc = (destructor)IO_dealloc,
    .tp_traverse = (traverseproc)IO_traverse,
    .tp_clear = (inquiry)IO_clear,
    .tp_methods = IO_methods,
    .tp_members = IO_members,
};
#endif /* __linux__ */

static int
intern(PyObject **slot, const char *text)
{
    return (*slot = PyUnicode_InternFromString(text)) == NULL ? -1 : 0;
}

static int
hot_exec(PyObject *module)
{
    if (intern(&str_drop, "_drop") < 0 || intern(&str_judge, "_judge") < 0
        || intern(&str_send_empty, "_send_empty") < 0 || intern(&str_answered, "answered") < 0
        || intern(&reason_oversize, "oversize") < 0
        || intern(&reason_privileged_port, "privileged_port") < 0
        || intern(&reason_denied_port, "denied_port") < 0
        || intern(&reason_broadcast_multicast, "broadcast_multicast") < 0
        || intern(&reason_loop, "loop") < 0
        || intern(&reason_rate_limit_global, "rate_limit_global") < 0
        || intern(&reason_rate_limit_source, "rate_limit_source") < 0)
        return -1;
#if defined(__linux__)
    if (intern(&str_datagram_received, "datagram_received") < 0
        || intern(&str_error_received, "error_received") < 0)
        return -1;
#endif
    if (loop_key_init() < 0)
        return -1;
    PyObject *defences = PyImport_ImportModule("wirekit_udp.defences");
    if (defences == NULL)
        return -1;
    source_key = PyObject_GetAttrString(defences, "source_key");
    Py_DECREF(defences);
    if (source_key == NULL)
        return -1;
    PyObject *time = PyImport_ImportModule("time");
    if (time == NULL)
        return -1;
    Py_XSETREF(monotonic, PyObject_GetAttrString(time, "monotonic"));
    Py_DECREF(time);
    if (monotonic == NULL)
        return -1;
    PyTypeObject *types[] = {&CellType, &BucketType, &LimiterType, &TableType, &CoreType};
    const char *names[] = {"Cell", "TokenBucket", "SourceLimiter", "LoopTable", "Core"};
    for (int i = 0; i < 5; i++) {
        if (PyType_Ready(types[i]) < 0)
            return -1;
        Py_INCREF(types[i]);
        if (PyModule_AddObject(module, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            return -1;
        }
    }
#if defined(__linux__)
    if (PyType_Ready(&IOType) < 0)
        return -1;
    Py_INCREF(&IOType);
    if (PyModule_AddObject(module, "DatagramIO", (PyObject *)&IOType) < 0) {
        Py_DECREF(&IOType);
        return -1;
    }
#endif
#if defined(__SIZEOF_INT128__)
    if (PyModule_AddStringConstant(module, "LOOP_KEY", "nh") < 0)
        return -1;
#else
    if (PyModule_AddStringConstant(module, "LOOP_KEY", "hash") < 0)
        return -1;
#endif
    return PyModule_AddStringConstant(module, "BUILD", "compiled");
}

static PyMethodDef hot_methods[] = {
    {"loop_key", (PyCFunction)(void (*)(void))hot_loop_key, METH_FASTCALL,
     "loop_key(data, addr): the loop guard's key of an answer of data to addr."},
    {NULL},
};

static PyModuleDef_Slot hot_slots[] = {
    {Py_mod_exec, hot_exec},
    {0, NULL},
};

static struct PyModuleDef hot_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wirekit_udp._hot",
    .m_doc = "The C build of udp's per-datagram path (the pure-Python _hot.py is the fallback).",
    .m_size = 0,
    .m_methods = hot_methods,
    .m_slots = hot_slots,
};

PyMODINIT_FUNC
PyInit__hot(void)
{
    return PyModuleDef_Init(&hot_module);
}
