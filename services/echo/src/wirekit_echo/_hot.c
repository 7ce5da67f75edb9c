/* The C build of wirekit_echo._hot (the pure-Python module of the same name is the fallback
 * and the reference: same names, same behaviour, same tests -- `make test-compiled`).
 *
 * What it is for: a Python-level attribute read or write costs about as much as the whole
 * per-message work of a bare uvloop echo. Here the state a read touches -- the connection's
 * activity and flags, the listener's counters and histogram -- lives in C structures, and a
 * read that is whole frames (the common case) costs two clock reads, a header walk, a few
 * additions and the one call it must make: transport.write(data). Everything else (a frame
 * split across reads, an oversize header, late input, the drain) goes to the same Python
 * code as the pure build: FramedEcho._relayed, _late_input, _finish_if_answered.
 *
 * Only CPython's stable-in-practice C API is used (no internals); built by tools/hatch_cext.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

static PyObject *str_write, *str_late_input, *str_finish_if_answered, *str_relayed;

/* perf_counter(): the Python code compares frame_started with its own perf_counter() values,
 * so this must be the same clock: CLOCK_MONOTONIC on Linux (CPython 3.11+), the clock of
 * mach_absolute_time() on macOS. */
static inline double
now(void)
{
    struct timespec ts;
#if defined(__APPLE__)
    clock_gettime(CLOCK_UPTIME_RAW, &ts);
#else
    clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

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
    .tp_name = "wirekit_echo._hot.Cell",
    .tp_doc = "One counter value: cell.n += k (a C long long).",
    .tp_basicsize = sizeof(CellObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_members = Cell_members,
};

/* -- Buckets: a histogram's state (wirekit_servicekit.metrics.Buckets' interface) ------------ */

typedef struct {
    PyObject_HEAD
    Py_ssize_t size;            /* number of finite bounds */
    double *bounds;             /* ascending */
    unsigned long long *counts; /* size + 1: the last one is +Inf */
    double sum;
    PyObject *labels;           /* list of str, size + 1 */
} BucketsObject;

static int
Buckets_init(BucketsObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"bounds", NULL};
    PyObject *bounds, *sorted = NULL, *labels = NULL, *utils = NULL, *go = NULL;
    int status = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &bounds))
        return -1;
    if (self->counts != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Buckets is already initialised");
        return -1;
    }
    if ((sorted = PySequence_List(bounds)) == NULL || PyList_Sort(sorted) < 0)
        goto done;
    Py_ssize_t size = PyList_GET_SIZE(sorted);
    /* The le labels as prometheus_client writes them (floatToGoString), +Inf last. */
    if ((utils = PyImport_ImportModule("prometheus_client.utils")) == NULL
        || (go = PyObject_GetAttrString(utils, "floatToGoString")) == NULL
        || (labels = PyList_New(size + 1)) == NULL)
        goto done;
    double *values = PyMem_Calloc(size ? size : 1, sizeof(double));
    unsigned long long *counts = PyMem_Calloc(size + 1, sizeof(unsigned long long));
    if (values == NULL || counts == NULL) {
        PyMem_Free(values);
        PyMem_Free(counts);
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i <= size; i++) {
        PyObject *label;
        if (i == size) {
            label = PyUnicode_FromString("+Inf");
        } else {
            values[i] = PyFloat_AsDouble(PyList_GET_ITEM(sorted, i));
            label = (values[i] == -1.0 && PyErr_Occurred())
                        ? NULL : PyObject_CallOneArg(go, PyList_GET_ITEM(sorted, i));
        }
        if (label == NULL) {
            PyMem_Free(values);
            PyMem_Free(counts);
            goto done;
        }
        PyList_SET_ITEM(labels, i, label);
    }
    self->bounds = values;
    self->counts = counts;
    self->size = size;
    self->labels = labels;
    labels = NULL;
    status = 0;
done:
    Py_XDECREF(sorted);
    Py_XDECREF(labels);
    Py_XDECREF(utils);
    Py_XDECREF(go);
    return status;
}

static void
Buckets_dealloc(BucketsObject *self)
{
    PyMem_Free(self->bounds);
    PyMem_Free(self->counts);
    Py_XDECREF(self->labels);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* bisect_left(bounds, value): the first bucket whose bound is >= value (NaN: the first). */
static inline void
buckets_observe(BucketsObject *self, double value)
{
    Py_ssize_t i = 0;
    while (i < self->size && self->bounds[i] < value)
        i++;
    self->counts[i]++;
    self->sum += value;
}

static PyObject *
Buckets_observe(BucketsObject *self, PyObject *arg)
{
    double value = PyFloat_AsDouble(arg);
    if (value == -1.0 && PyErr_Occurred())
        return NULL;
    if (self->counts == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Buckets is not initialised");
        return NULL;
    }
    buckets_observe(self, value);
    Py_RETURN_NONE;
}

static PyObject *
Buckets_cumulative(BucketsObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->counts == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Buckets is not initialised");
        return NULL;
    }
    /* A copy first, as the pure build takes one: building the answer allocates, and an
     * allocation may run a collection (finalizers, other threads) in between. */
    unsigned long long *counts = PyMem_Malloc((self->size + 1) * sizeof(unsigned long long));
    if (counts == NULL)
        return PyErr_NoMemory();
    memcpy(counts, self->counts, (self->size + 1) * sizeof(unsigned long long));
    double sum = self->sum;
    PyObject *out = PyList_New(self->size + 1);
    if (out == NULL) {
        PyMem_Free(counts);
        return NULL;
    }
    unsigned long long running = 0;
    for (Py_ssize_t i = 0; i <= self->size; i++) {
        running += counts[i];
        PyObject *pair = Py_BuildValue("(Od)", PyList_GET_ITEM(self->labels, i), (double)running);
        if (pair == NULL) {
            PyMem_Free(counts);
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, pair);
    }
    PyMem_Free(counts);
    return Py_BuildValue("(Nd)", out, sum);
}

static PyObject *
Buckets_get_counts(BucketsObject *self, void *Py_UNUSED(closure))
{
    if (self->counts == NULL)
        return PyList_New(0);
    PyObject *out = PyList_New(self->size + 1);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i <= self->size; i++) {
        PyObject *n = PyLong_FromUnsignedLongLong(self->counts[i]);
        if (n == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, n);
    }
    return out;
}

static PyObject *
Buckets_get_bounds(BucketsObject *self, void *Py_UNUSED(closure))
{
    PyObject *out = PyList_New(self->size);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->size; i++) {
        PyObject *b = PyFloat_FromDouble(self->bounds[i]);
        if (b == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, b);
    }
    return out;
}

static PyObject *
Buckets_get_sum(BucketsObject *self, void *Py_UNUSED(closure))
{
    return PyFloat_FromDouble(self->sum);
}

static PyObject *
Buckets_get_labels(BucketsObject *self, void *Py_UNUSED(closure))
{
    if (self->labels == NULL)
        return PyList_New(0);
    return PyList_GetSlice(self->labels, 0, PyList_GET_SIZE(self->labels));
}

static PyMethodDef Buckets_methods[] = {
    {"observe", (PyCFunction)Buckets_observe, METH_O, "Count one value."},
    {"cumulative", (PyCFunction)Buckets_cumulative, METH_NOARGS,
     "The buckets as Prometheus has them (cumulative, le labels), and the sum."},
    {NULL},
};

static PyGetSetDef Buckets_getset[] = {
    {"counts", (getter)Buckets_get_counts, NULL, "A copy of the counts (the last is +Inf).", NULL},
    {"bounds", (getter)Buckets_get_bounds, NULL, "The finite bounds, ascending.", NULL},
    {"sum", (getter)Buckets_get_sum, NULL, "The sum of the values observed.", NULL},
    {"labels", (getter)Buckets_get_labels, NULL, "The le labels, +Inf last.", NULL},
    {NULL},
};

static PyTypeObject BucketsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wirekit_echo._hot.Buckets",
    .tp_doc = "Buckets(bounds): a histogram's state, observe() without a lock.",
    .tp_basicsize = sizeof(BucketsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Buckets_init,
    .tp_dealloc = (destructor)Buckets_dealloc,
    .tp_methods = Buckets_methods,
    .tp_getset = Buckets_getset,
};

/* -- Core: the state of one echo connection that its reads touch ----------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *ctx;
    PyObject *transport;
    long long activity;
    double frame_started;
    char finished;
    char draining;
    Py_ssize_t pending; /* framed: what the decoder holds (-1: broken), set by _relayed */
    Py_ssize_t max_frame_size;
    CellObject *received, *sent, *frames;
    BucketsObject *handling;
} CoreObject;

static int
Core_traverse(CoreObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->ctx);
    Py_VISIT(self->transport);
    Py_VISIT(self->received);
    Py_VISIT(self->sent);
    Py_VISIT(self->frames);
    Py_VISIT(self->handling);
    return 0;
}

static int
Core_clear(CoreObject *self)
{
    Py_CLEAR(self->ctx);
    Py_CLEAR(self->transport);
    Py_CLEAR(self->received);
    Py_CLEAR(self->sent);
    Py_CLEAR(self->frames);
    Py_CLEAR(self->handling);
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
    if (self != NULL) {
        Py_INCREF(Py_None);
        self->transport = Py_None;
    }
    return (PyObject *)self;
}

/* ctx.<name>, checked to be of the C type (EchoMetrics makes them when this module is C). */
static int
take(PyObject *owner, const char *name, PyTypeObject *type, PyObject **slot)
{
    PyObject *value = PyObject_GetAttrString(owner, name);
    if (value == NULL)
        return -1;
    if (!PyObject_TypeCheck(value, type)) {
        PyErr_Format(PyExc_TypeError, "%s must be a %s, not %s", name, type->tp_name,
                     Py_TYPE(value)->tp_name);
        Py_DECREF(value);
        return -1;
    }
    Py_XSETREF(*slot, value);
    return 0;
}

static int
Core_init(CoreObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ctx", NULL};
    PyObject *ctx, *handling = NULL, *size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &ctx))
        return -1;
    if (take(ctx, "received", &CellType, (PyObject **)&self->received) < 0
        || take(ctx, "sent", &CellType, (PyObject **)&self->sent) < 0
        || take(ctx, "frames", &CellType, (PyObject **)&self->frames) < 0)
        return -1;
    handling = PyObject_GetAttrString(ctx, "handling");
    if (handling == NULL)
        return -1;
    int failed = take(handling, "buckets", &BucketsType, (PyObject **)&self->handling);
    Py_DECREF(handling);
    if (failed)
        return -1;
    size = PyObject_GetAttrString(ctx, "max_frame_size");
    if (size == NULL)
        return -1;
    self->max_frame_size = PyLong_AsSsize_t(size);
    Py_DECREF(size);
    if (self->max_frame_size == -1 && PyErr_Occurred())
        return -1;
    Py_INCREF(ctx);
    Py_XSETREF(self->ctx, ctx);
    self->activity = 0;
    self->frame_started = 0.0;
    self->finished = 0;
    self->draining = 0;
    self->pending = 0;
    return 0;
}

static inline PyObject *
call_method(PyObject *self, PyObject *name, PyObject *arg)
{
    PyObject *args[2] = {self, arg};
    return PyObject_VectorcallMethod(name, args, (arg ? 2 : 1) | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     NULL);
}

/* The tail both paths share: the drain looks again once the read is answered. */
static inline PyObject *
after_reply(CoreObject *self)
{
    if (self->draining)
        return call_method((PyObject *)self, str_finish_if_answered, NULL);
    Py_RETURN_NONE;
}

static PyObject *
late_input(CoreObject *self, Py_ssize_t n)
{
    PyObject *count = PyLong_FromSsize_t(n);
    if (count == NULL)
        return NULL;
    PyObject *result = call_method((PyObject *)self, str_late_input, count);
    Py_DECREF(count);
    return result;
}

static PyObject *
transport_write(CoreObject *self, PyObject *data)
{
    PyObject *transport = self->transport;
    if (transport == NULL) {
        PyErr_SetString(PyExc_AttributeError, "transport");
        return NULL;
    }
    Py_INCREF(transport); /* held for the call: the call may replace self->transport */
    PyObject *result = call_method(transport, str_write, data);
    Py_DECREF(transport);
    if (result == NULL)
        return NULL;
    Py_DECREF(result);
    return Py_None; /* borrowed: only compared with NULL */
}

/* Core.__init__ has run (a subclass that skips it gets an error, not a crash). */
static inline int
ready(CoreObject *self)
{
    if (self->received == NULL || self->sent == NULL || self->frames == NULL
        || self->handling == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Core.__init__ has not run");
        return -1;
    }
    return 0;
}

static PyObject *
Core_raw_data_received(CoreObject *self, PyObject *data)
{
    if (ready(self) < 0)
        return NULL;
    Py_ssize_t n = PyObject_Length(data);
    if (n < 0)
        return NULL;
    self->activity += n;
    self->received->n += n;
    if (self->finished)
        return late_input(self, n);
    if (transport_write(self, data) == NULL)
        return NULL;
    self->sent->n += n;
    return after_reply(self);
}

/* Exactly whole frames, each within the limit? Then how many (else 0). */
static inline Py_ssize_t
whole_frames(const unsigned char *p, Py_ssize_t len, Py_ssize_t max)
{
    /* unsigned and 64-bit whatever Py_ssize_t is: a header of 0x80000000 is a large size,
     * never a negative one */
    uint64_t pos = 0, end = (uint64_t)len, limit = max < 0 ? 0 : (uint64_t)max;
    Py_ssize_t count = 0;
    while (end - pos >= 4) {
        uint64_t size = ((uint64_t)p[pos] << 24) | ((uint64_t)p[pos + 1] << 16)
                        | ((uint64_t)p[pos + 2] << 8) | (uint64_t)p[pos + 3];
        if (size > limit || size > end - pos - 4)
            return 0;
        pos += 4 + size;
        count++;
    }
    return pos == end ? count : 0;
}

static PyObject *
Core_framed_data_received(CoreObject *self, PyObject *data)
{
    double start = now();
    if (ready(self) < 0)
        return NULL;
    Py_ssize_t n = PyObject_Length(data);
    if (n < 0)
        return NULL;
    self->activity += n;
    self->received->n += n;
    if (self->finished)
        return late_input(self, n);
    Py_ssize_t count;
    if (self->pending == 0 && PyBytes_CheckExact(data)
        && (count = whole_frames((const unsigned char *)PyBytes_AS_STRING(data), n,
                                 self->max_frame_size))) {
        /* Nothing buffered before or after: the read is its own reply. */
        if (transport_write(self, data) == NULL)
            return NULL;
        self->sent->n += n;
        self->frames->n += count;
        buckets_observe(self->handling, now() - start);
        return after_reply(self);
    }
    PyObject *started = PyFloat_FromDouble(start);
    if (started == NULL)
        return NULL;
    PyObject *args[3] = {(PyObject *)self, data, started};
    PyObject *result = PyObject_VectorcallMethod(str_relayed, args, 3, NULL);
    Py_DECREF(started);
    return result;
}

static PyMethodDef Core_methods[] = {
    {"raw_data_received", (PyCFunction)Core_raw_data_received, METH_O,
     "RawEcho.data_received: every byte back as it arrives."},
    {"framed_data_received", (PyCFunction)Core_framed_data_received, METH_O,
     "FramedEcho.data_received: a read of whole frames is written back as is; any other "
     "read goes to self._relayed(data, start)."},
    {NULL},
};

static PyMemberDef Core_members[] = {
    {"ctx", T_OBJECT, offsetof(CoreObject, ctx), READONLY, "The listener's EchoContext."},
    {"transport", T_OBJECT, offsetof(CoreObject, transport), 0, "The transport, once made."},
    {"activity", T_LONGLONG, offsetof(CoreObject, activity), 0,
     "Bytes received (and resumes); the hub's sweeper watches it move."},
    {"frame_started", T_DOUBLE, offsetof(CoreObject, frame_started), 0,
     "perf_counter() of the first byte of a frame in progress, else 0.0."},
    {"finished", T_BOOL, offsetof(CoreObject, finished), 0, "No more replies."},
    {"draining", T_BOOL, offsetof(CoreObject, draining), 0, "The service is draining."},
    {"pending", T_PYSSIZET, offsetof(CoreObject, pending), 0,
     "Framed: bytes the decoder holds; -1 once it is broken."},
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wirekit_echo._hot.Core",
    .tp_doc = "Core(ctx): the state of an echo connection that its reads touch.",
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

static int
hot_exec(PyObject *module)
{
    if ((str_write = PyUnicode_InternFromString("write")) == NULL
        || (str_late_input = PyUnicode_InternFromString("_late_input")) == NULL
        || (str_finish_if_answered = PyUnicode_InternFromString("_finish_if_answered")) == NULL
        || (str_relayed = PyUnicode_InternFromString("_relayed")) == NULL)
        return -1;
    PyTypeObject *types[] = {&CellType, &BucketsType, &CoreType};
    const char *names[] = {"Cell", "Buckets", "Core"};
    for (int i = 0; i < 3; i++) {
        if (PyType_Ready(types[i]) < 0)
            return -1;
        Py_INCREF(types[i]);
        if (PyModule_AddObject(module, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            return -1;
        }
    }
    return PyModule_AddStringConstant(module, "BUILD", "compiled");
}

static PyModuleDef_Slot hot_slots[] = {
    {Py_mod_exec, hot_exec},
    {0, NULL},
};

static struct PyModuleDef hot_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wirekit_echo._hot",
    .m_doc = "The C build of echo's per-read path (the pure-Python _hot.py is the fallback).",
    .m_size = 0,
    .m_slots = hot_slots,
};

PyMODINIT_FUNC
PyInit__hot(void)
{
    return PyModuleDef_Init(&hot_module);
}
