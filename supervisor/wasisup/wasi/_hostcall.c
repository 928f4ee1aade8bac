/* The host-call trampoline in C: wasmtime calls it for every host function a guest imports.
 *
 * It converts the call's component-model arguments (wasmtime_component_val_t, 32 bytes: a kind
 * byte, then an 8-aligned payload) into Python objects, calls the host function, and writes its
 * result back, by a type tree built once per function at link time (abi.py builds the spec): a
 * call costs a GIL acquisition and the Python function itself. Host functions that wait are
 * bound as async ones (see "Host functions that wait" below), and the guest's incoming handler
 * is started here as a call future (CallFuture) the worker's loop polls.
 *
 * wasmtime's C API functions it needs are handed over by address (abi.py reads them from the
 * library wasmtime-py loaded), so this module links against nothing but Python.
 * The Python shapes of WIT values are documented in abi.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

/* wasmtime_component_val_t kinds, and the spec-only kinds abi.py adds for special cases */
enum {
    K_BOOL, K_S8, K_U8, K_S16, K_U16, K_S32, K_U32, K_S64, K_U64, K_F32, K_F64, K_CHAR,
    K_STRING, K_LIST, K_RECORD, K_TUPLE, K_VARIANT, K_ENUM, K_OPTION, K_RESULT, K_FLAGS,
    K_RESOURCE,
    K_BYTES = 100, /* list<u8>: Python bytes */
    K_BORROW = 101,
    K_OWN = 102,
};

#define VAL_SIZE 32
#define RECORD_ENTRY_SIZE 48 /* wasm_name_t (16) + wasmtime_component_val_t (32) */
#define NAME_SIZE 16

typedef struct { size_t size; uint8_t *data; } vec_t;

/* wasmtime's C API, filled in by setup() */
static void (*byte_vec_new)(void *out, size_t size, const char *data);
static void (*vallist_new_uninit)(void *out, size_t size);
static void (*valtuple_new_uninit)(void *out, size_t size);
static void (*valrecord_new_uninit)(void *out, size_t size);
static void (*valflags_new_uninit)(void *out, size_t size);
static void *(*val_new)(void *val); /* moves *val to the heap, leaving `false` behind */
static void *(*host_new)(bool owned, uint32_t rep, uint32_t type);
static uint32_t (*host_rep)(const void *host);
static void (*host_delete)(void *host);
static void *(*any_to_host)(void *ctx, const void *any, void **host_out);
static void *(*host_to_any)(void *ctx, const void *host, void **any_out);
static void *(*error_new)(const char *message);
static void (*error_delete)(void *error);
static void *(*func_call_async)(const void *func, void *ctx, const void *args, size_t nargs,
                                void *results, size_t nresults, void **error_out);
static bool (*future_poll)(void *future);
static void (*future_delete)(void *future);
static void (*val_delete)(void *val);
static void (*val_free)(void *val);

/* Python objects, filled in by setup() */
static PyObject *Ok, *Err, *Trap, *stores, *on_failure, *on_drop;
static PyObject *s_get, *s_remove, *s_add, *s_value, *s_resource_id;

/* The pending exception, taken (NULL if none); and put back. */
#if PY_VERSION_HEX >= 0x030C0000
static PyObject *take_exception(void) { return PyErr_GetRaisedException(); }
static void restore_exception(PyObject *exc) { PyErr_SetRaisedException(exc); }
#else
static PyObject *take_exception(void) {
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL) PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
}
static void restore_exception(PyObject *exc) {
    if (exc == NULL) return;
    PyErr_Restore(Py_NewRef(Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
}
#endif

/* ------------------------------------------------------------------------------------------ */
/* Types */

typedef struct Type {
    int kind;
    Py_ssize_t count;      /* children (tuple, record, variant) or names (enum, flags) */
    struct Type **items;   /* list/option: items[0]; result: ok, err; record/variant: per name */
    PyObject **names;      /* str: record fields, variant cases, enum cases */
    bool owns;             /* holds an own<T> somewhere (whose handle a failed lowering gives back) */
} Type;

static void type_free(Type *t) {
    if (t == NULL) return;
    for (Py_ssize_t i = 0; i < t->count; i++) {
        if (t->items) type_free(t->items[i]);
        if (t->names) Py_XDECREF(t->names[i]);
    }
    PyMem_Free(t->items);
    PyMem_Free(t->names);
    PyMem_Free(t);
}

/* spec: (kind,) | (K_LIST|K_OPTION, spec) | (K_RESULT, spec|None, spec|None)
 *       | (K_TUPLE, (spec, ...)) | (K_RECORD|K_VARIANT, ((name, spec|None), ...))
 *       | (K_ENUM|K_FLAGS, (name, ...)) */
static Type *type_from_spec(PyObject *spec) {
    if (spec == Py_None) return NULL;
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) < 1) {
        PyErr_SetString(PyExc_TypeError, "a type spec is a tuple starting with its kind");
        return NULL;
    }
    Type *t = PyMem_Calloc(1, sizeof(Type));
    if (t == NULL) return (Type *)PyErr_NoMemory();
    t->kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
    Py_ssize_t n = PyTuple_GET_SIZE(spec);
    switch (t->kind) {
    case K_LIST: case K_OPTION: case K_RESULT: {
        Py_ssize_t children = t->kind == K_RESULT ? 2 : 1;
        if (n != children + 1) goto bad;
        t->items = PyMem_Calloc(children, sizeof(Type *));
        if (t->items == NULL) goto nomem;
        t->count = children;
        for (Py_ssize_t i = 0; i < children; i++) {
            PyObject *child = PyTuple_GET_ITEM(spec, i + 1);
            t->items[i] = type_from_spec(child);
            if (t->items[i] == NULL && child != Py_None) goto fail;
        }
        if (t->kind != K_RESULT && t->items[0] == NULL) goto bad;
        for (Py_ssize_t i = 0; i < children; i++) t->owns |= t->items[i] && t->items[i]->owns;
        return t;
    }
    case K_TUPLE: case K_RECORD: case K_VARIANT: case K_ENUM: case K_FLAGS: {
        if (n != 2 || !PyTuple_Check(PyTuple_GET_ITEM(spec, 1))) goto bad;
        PyObject *parts = PyTuple_GET_ITEM(spec, 1);
        Py_ssize_t count = PyTuple_GET_SIZE(parts);
        bool named = t->kind != K_TUPLE, typed = t->kind != K_ENUM && t->kind != K_FLAGS;
        if (named) {
            t->names = PyMem_Calloc(count ? count : 1, sizeof(PyObject *));
            if (t->names == NULL) goto nomem;
        }
        if (typed) {
            t->items = PyMem_Calloc(count ? count : 1, sizeof(Type *));
            if (t->items == NULL) goto nomem;
        }
        t->count = count;
        for (Py_ssize_t i = 0; i < count; i++) {
            PyObject *part = PyTuple_GET_ITEM(parts, i), *name = part, *child = part;
            if (named && typed) {
                if (!PyTuple_Check(part) || PyTuple_GET_SIZE(part) != 2) goto bad;
                name = PyTuple_GET_ITEM(part, 0);
                child = PyTuple_GET_ITEM(part, 1);
            }
            if (named) {
                if (!PyUnicode_Check(name)) goto bad;
                Py_INCREF(name);
                t->names[i] = name;
            }
            if (typed) {
                t->items[i] = type_from_spec(child);
                if (t->items[i] == NULL && (child != Py_None || t->kind != K_VARIANT)) {
                    if (!PyErr_Occurred()) goto bad;
                    goto fail;
                }
                t->owns |= t->items[i] && t->items[i]->owns;
            }
        }
        return t;
    }
    default:
        if (n != 1 || t->kind < K_BOOL || (t->kind > K_STRING && t->kind < K_BYTES)
            || t->kind > K_OWN) goto bad;
        t->owns = t->kind == K_OWN;
        return t;
    }
bad:
    PyErr_Format(PyExc_ValueError, "malformed type spec %R", spec);
    goto fail;
nomem:
    PyErr_NoMemory();
fail:
    type_free(t);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Lifting: guest value in C memory -> Python */

static PyObject *lift(const Type *t, const uint8_t *v, void *ctx, PyObject *res);

static inline const vec_t *vec_at(const uint8_t *p) { return (const vec_t *)p; }
static inline void *ptr_at(const uint8_t *p) { return *(void *const *)p; }

static PyObject *decode_name(const uint8_t *p) {
    const vec_t *name = vec_at(p);
    return PyUnicode_DecodeUTF8((const char *)name->data, (Py_ssize_t)name->size, NULL);
}

/* The case (index) whose name the C API wrote at p; -1 with an exception if none matches. */
static Py_ssize_t find_case(const Type *t, const uint8_t *p) {
    const vec_t *name = vec_at(p);
    for (Py_ssize_t i = 0; i < t->count; i++) {
        Py_ssize_t size;
        const char *utf8 = PyUnicode_AsUTF8AndSize(t->names[i], &size);
        if (utf8 == NULL) return -1;
        if ((size_t)size == name->size && memcmp(utf8, name->data, name->size) == 0) return i;
    }
    PyErr_Format(PyExc_ValueError, "unknown case %.*s", (int)name->size, name->data);
    return -1;
}

static PyObject *size_mismatch(const Type *t, size_t size) {
    PyErr_Format(PyExc_ValueError, "%zd values were expected, not %zu", t->count, size);
    return NULL;
}

static PyObject *lift_resource(bool owned, const uint8_t *v, void *ctx, PyObject *res) {
    void *host = NULL;
    void *error = any_to_host(ctx, ptr_at(v + 8), &host);
    if (error) {
        error_delete(error);
        PyErr_SetString(Trap, "a resource of the wrong type was passed to the host");
        return NULL;
    }
    uint32_t rep = host_rep(host);
    host_delete(host);
    PyObject *key = PyLong_FromUnsignedLong(rep);
    if (key == NULL) return NULL;
    PyObject *obj = PyObject_CallMethodOneArg(res, owned ? s_remove : s_get, key);
    Py_DECREF(key);
    return obj;
}

static PyObject *lift(const Type *t, const uint8_t *v, void *ctx, PyObject *res) {
    const uint8_t *p = v + 8;
    switch (t->kind) {
    case K_BOOL: return PyBool_FromLong(*p != 0);
    case K_S8: return PyLong_FromLong(*(const int8_t *)p);
    case K_U8: return PyLong_FromLong(*p);
    case K_S16: return PyLong_FromLong(*(const int16_t *)p);
    case K_U16: return PyLong_FromLong(*(const uint16_t *)p);
    case K_S32: return PyLong_FromLong(*(const int32_t *)p);
    case K_U32: return PyLong_FromUnsignedLong(*(const uint32_t *)p);
    case K_S64: return PyLong_FromLongLong(*(const int64_t *)p);
    case K_U64: return PyLong_FromUnsignedLongLong(*(const uint64_t *)p);
    case K_F32: return PyFloat_FromDouble(*(const float *)p);
    case K_F64: return PyFloat_FromDouble(*(const double *)p);
    case K_CHAR: {
        Py_UCS4 c = *(const uint32_t *)p;
        return PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, &c, 1);
    }
    case K_STRING: return decode_name(p);
    case K_BYTES: {
        const vec_t *list = vec_at(p);
        PyObject *bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)list->size);
        if (bytes == NULL) return NULL;
        char *out = PyBytes_AS_STRING(bytes);
        const uint8_t *in = list->data + 8;
        for (size_t i = 0; i < list->size; i++) out[i] = (char)in[i * VAL_SIZE];
        return bytes;
    }
    case K_LIST: {
        const vec_t *list = vec_at(p);
        PyObject *out = PyList_New((Py_ssize_t)list->size);
        if (out == NULL) return NULL;
        for (size_t i = 0; i < list->size; i++) {
            PyObject *item = lift(t->items[0], list->data + i * VAL_SIZE, ctx, res);
            if (item == NULL) { Py_DECREF(out); return NULL; }
            PyList_SET_ITEM(out, (Py_ssize_t)i, item);
        }
        return out;
    }
    case K_TUPLE: {
        const vec_t *tuple = vec_at(p);
        if (tuple->size != (size_t)t->count) return size_mismatch(t, tuple->size);
        PyObject *out = PyTuple_New(t->count);
        if (out == NULL) return NULL;
        for (Py_ssize_t i = 0; i < t->count; i++) {
            PyObject *item = lift(t->items[i], tuple->data + i * VAL_SIZE, ctx, res);
            if (item == NULL) { Py_DECREF(out); return NULL; }
            PyTuple_SET_ITEM(out, i, item);
        }
        return out;
    }
    case K_RECORD: {
        const vec_t *record = vec_at(p);
        if (record->size != (size_t)t->count) return size_mismatch(t, record->size);
        PyObject *out = PyDict_New();
        if (out == NULL) return NULL;
        for (Py_ssize_t i = 0; i < t->count; i++) {
            const uint8_t *entry = record->data + i * RECORD_ENTRY_SIZE;
            PyObject *item = lift(t->items[i], entry + NAME_SIZE, ctx, res);
            if (item == NULL || PyDict_SetItem(out, t->names[i], item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(item);
        }
        return out;
    }
    case K_OPTION: {
        const uint8_t *payload = ptr_at(p);
        if (payload == NULL) Py_RETURN_NONE;
        return lift(t->items[0], payload, ctx, res);
    }
    case K_RESULT: {
        bool is_ok = *p != 0;
        const uint8_t *payload = ptr_at(p + 8);
        const Type *payload_type = t->items[is_ok ? 0 : 1];
        PyObject *value;
        if (payload_type != NULL && payload != NULL) {
            value = lift(payload_type, payload, ctx, res);
            if (value == NULL) return NULL;
        } else {
            value = Py_NewRef(Py_None);
        }
        PyObject *out = PyObject_CallOneArg(is_ok ? Ok : Err, value);
        Py_DECREF(value);
        return out;
    }
    case K_VARIANT: {
        Py_ssize_t i = find_case(t, p);
        if (i < 0) return NULL;
        if (t->items[i] == NULL) return Py_NewRef(t->names[i]);
        PyObject *payload = lift(t->items[i], ptr_at(p + NAME_SIZE), ctx, res);
        if (payload == NULL) return NULL;
        PyObject *out = PyTuple_Pack(2, t->names[i], payload);
        Py_DECREF(payload);
        return out;
    }
    case K_ENUM: {
        Py_ssize_t i = find_case(t, p);
        return i < 0 ? NULL : Py_NewRef(t->names[i]);
    }
    case K_FLAGS: {
        const vec_t *flags = vec_at(p);
        PyObject *out = PySet_New(NULL);
        if (out == NULL) return NULL;
        for (size_t i = 0; i < flags->size; i++) {
            PyObject *name = decode_name(flags->data + i * NAME_SIZE);
            if (name == NULL || PySet_Add(out, name) < 0) {
                Py_XDECREF(name);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(name);
        }
        return out;
    }
    case K_BORROW: return lift_resource(false, v, ctx, res);
    case K_OWN: return lift_resource(true, v, ctx, res);
    }
    PyErr_Format(PyExc_NotImplementedError, "no host support for value kind %d", t->kind);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Lowering: Python -> value in C memory (nested storage allocated by the C API, freed by wasmtime)
 *
 * `lower` writes into a slot that holds `false` (a value that owns nothing). wasmtime frees
 * whatever a slot holds, so a slot never holds a kind without its payload: a value is converted
 * before its kind is marked, and a container's storage is zeroed (`false` elements, empty names)
 * as soon as it is allocated. On failure `lower` leaves the slot `false` again, having released
 * what it made on the way: storage, and the table entries of resources it handed over. */

static int lower(const Type *t, PyObject *value, uint8_t *v, void *ctx, PyObject *res,
                 bool top_level_result);

static void forget(uint8_t *v) { memset(v, 0, VAL_SIZE); }

static int write_name(uint8_t *p, PyObject *name) {
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(name, &size);
    if (utf8 == NULL) return -1;
    byte_vec_new(p, (size_t)size, utf8);
    return 0;
}

/* The Python side lets go of the resource behind table entry `rep` (as when the guest drops it). */
static void release_rep(void *ctx, uint32_t rep) {
    PyObject *done = PyObject_CallFunction(on_drop, "NI", PyLong_FromVoidPtr(ctx), (unsigned int)rep);
    if (done == NULL) PyErr_WriteUnraisable(on_drop);
    Py_XDECREF(done);
}

/* Give back the own<T> handles inside a lowered value (before its storage is freed). */
static void release_handles(const Type *t, const uint8_t *v, void *ctx) {
    const uint8_t *p = v + 8;
    if (t == NULL || !t->owns || (v[0] != t->kind && !(t->kind == K_OWN && v[0] == K_RESOURCE)))
        return;
    switch (t->kind) {
    case K_OWN: {
        void *host = NULL, *error = any_to_host(ctx, ptr_at(p), &host);
        if (error) { error_delete(error); return; }
        uint32_t rep = host_rep(host);
        host_delete(host);
        release_rep(ctx, rep);
        return;
    }
    case K_LIST: case K_TUPLE: {
        const vec_t *items = vec_at(p);
        for (size_t i = 0; i < items->size; i++)
            release_handles(t->items[t->kind == K_LIST ? 0 : i], items->data + i * VAL_SIZE, ctx);
        return;
    }
    case K_RECORD: {
        const vec_t *entries = vec_at(p);
        for (size_t i = 0; i < entries->size; i++)
            release_handles(t->items[i], entries->data + i * RECORD_ENTRY_SIZE + NAME_SIZE, ctx);
        return;
    }
    case K_OPTION:
        if (ptr_at(p)) release_handles(t->items[0], ptr_at(p), ctx);
        return;
    case K_RESULT:
        if (ptr_at(p + 8)) release_handles(t->items[*p ? 0 : 1], ptr_at(p + 8), ctx);
        return;
    case K_VARIANT: {
        const vec_t *name = vec_at(p);
        for (Py_ssize_t i = 0; i < t->count; i++) {
            Py_ssize_t size;
            const char *utf8 = PyUnicode_AsUTF8AndSize(t->names[i], &size);
            if (utf8 && (size_t)size == name->size && memcmp(utf8, name->data, name->size) == 0) {
                if (ptr_at(p + NAME_SIZE)) release_handles(t->items[i], ptr_at(p + NAME_SIZE), ctx);
                return;
            }
        }
        return;
    }
    }
}

/* Take back a value `lower` had (partly) built when a later step failed: its handles go back
 * to the table, its storage is freed, the slot is `false` again. Keeps the pending exception. */
static void unlower(const Type *t, uint8_t *v, void *ctx) {
    PyObject *exc = take_exception();
    release_handles(t, v, ctx);
    PyErr_Clear();
    val_delete(v);
    forget(v);
    restore_exception(exc);
}

/* Lower value into a heap-allocated val (an option/result/variant payload); NULL on error. */
static void *boxed(const Type *t, PyObject *value, void *ctx, PyObject *res) {
    uint8_t placeholder[VAL_SIZE] = {K_BOOL}; /* `false`: nothing to free when overwritten */
    uint8_t *box = val_new(placeholder);
    if (lower(t, value, box, ctx, res, false) < 0) {
        val_free(box);
        return NULL;
    }
    return box;
}

static int lower_int(PyObject *value, uint8_t *p, int kind) {
    if (kind == K_U64) {
        unsigned long long u = PyLong_AsUnsignedLongLong(value);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) return -1;
        *(uint64_t *)p = u;
        return 0;
    }
    long long x = PyLong_AsLongLong(value);
    if (x == -1 && PyErr_Occurred()) return -1;
    static const long long lo[] = {[K_S8] = INT8_MIN, [K_U8] = 0, [K_S16] = INT16_MIN,
                                   [K_U16] = 0, [K_S32] = INT32_MIN, [K_U32] = 0,
                                   [K_S64] = INT64_MIN};
    static const long long hi[] = {[K_S8] = INT8_MAX, [K_U8] = UINT8_MAX, [K_S16] = INT16_MAX,
                                   [K_U16] = UINT16_MAX, [K_S32] = INT32_MAX,
                                   [K_U32] = UINT32_MAX, [K_S64] = INT64_MAX};
    if (x < lo[kind] || x > hi[kind]) {
        PyErr_Format(PyExc_OverflowError, "%lld does not fit the WIT integer type", x);
        return -1;
    }
    switch (kind) {
    case K_S8: case K_U8: *p = (uint8_t)x; break;
    case K_S16: case K_U16: *(uint16_t *)p = (uint16_t)x; break;
    case K_S32: case K_U32: *(uint32_t *)p = (uint32_t)x; break;
    default: *(int64_t *)p = x;
    }
    return 0;
}

static int lower_own(PyObject *value, uint8_t *v, void *ctx, PyObject *res) {
    PyObject *id_obj = PyObject_GetAttr(value, s_resource_id);
    if (id_obj == NULL) return -1;
    unsigned long id = PyLong_AsUnsignedLong(id_obj);
    Py_DECREF(id_obj);
    if (PyErr_Occurred()) return -1;
    PyObject *rep_obj = PyObject_CallMethodOneArg(res, s_add, value);
    if (rep_obj == NULL) return -1;
    unsigned long rep = PyLong_AsUnsignedLong(rep_obj);
    Py_DECREF(rep_obj);
    if (PyErr_Occurred()) return -1;
    void *host = host_new(true, (uint32_t)rep, (uint32_t)id);
    void *any = NULL;
    void *error = host_to_any(ctx, host, &any);
    host_delete(host);
    if (error) {
        error_delete(error);
        PyObject *taken = PyObject_CallMethod(res, "remove", "k", rep);
        Py_XDECREF(taken);
        PyErr_Clear();
        PyErr_Format(Trap, "cannot hand a %s to the guest", Py_TYPE(value)->tp_name);
        return -1;
    }
    *(void **)(v + 8) = any;
    v[0] = K_RESOURCE;
    return 0;
}

/* Find the case named `name` (a str) of a variant or enum; -1 with KeyError if none. */
static Py_ssize_t case_index(const Type *t, PyObject *name) {
    for (Py_ssize_t i = 0; i < t->count; i++) {
        if (t->names[i] == name) return i;
    }
    for (Py_ssize_t i = 0; i < t->count; i++) {
        int equal = PyObject_RichCompareBool(t->names[i], name, Py_EQ);
        if (equal < 0) return -1;
        if (equal) return i;
    }
    PyErr_SetObject(PyExc_KeyError, name);
    return -1;
}

/* A list, tuple or record of `n` elements of `size` bytes, allocated and zeroed in the slot. */
static uint8_t *new_elements(uint8_t *v, int kind, size_t n) {
    uint8_t *p = v + 8;
    size_t size = VAL_SIZE;
    switch (kind) {
    case K_LIST: vallist_new_uninit(p, n); break;
    case K_TUPLE: valtuple_new_uninit(p, n); break;
    case K_RECORD: valrecord_new_uninit(p, n); size = RECORD_ENTRY_SIZE; break;
    default: valflags_new_uninit(p, n); size = NAME_SIZE; break;
    }
    uint8_t *data = ((vec_t *)p)->data;
    if (n) memset(data, 0, n * size);
    v[0] = (uint8_t)kind;
    return data;
}

static int lower_value(const Type *t, PyObject *value, uint8_t *v, void *ctx, PyObject *res,
                       bool top_level_result) {
    uint8_t *p = v + 8;
    switch (t->kind) {
    case K_BOOL: {
        int truth = PyObject_IsTrue(value);
        if (truth < 0) return -1;
        *p = (uint8_t)truth;
        v[0] = K_BOOL;
        return 0;
    }
    case K_S8: case K_U8: case K_S16: case K_U16: case K_S32: case K_U32: case K_S64: case K_U64:
        if (lower_int(value, p, t->kind) < 0) return -1;
        v[0] = (uint8_t)t->kind;
        return 0;
    case K_F32: case K_F64: {
        double x = PyFloat_AsDouble(value);
        if (x == -1.0 && PyErr_Occurred()) return -1;
        if (t->kind == K_F32) *(float *)p = (float)x;
        else *(double *)p = x;
        v[0] = (uint8_t)t->kind;
        return 0;
    }
    case K_CHAR: {
        if (!PyUnicode_Check(value) || PyUnicode_GET_LENGTH(value) != 1) {
            PyErr_SetString(PyExc_TypeError, "a WIT char is a str of length 1");
            return -1;
        }
        Py_UCS4 c = PyUnicode_READ_CHAR(value, 0);
        if (c >= 0xD800 && c <= 0xDFFF) {
            PyErr_SetString(PyExc_ValueError, "a WIT char is a Unicode scalar value, not a surrogate");
            return -1;
        }
        *(uint32_t *)p = c;
        v[0] = K_CHAR;
        return 0;
    }
    case K_STRING:
        if (write_name(p, value) < 0) return -1;
        v[0] = K_STRING;
        return 0;
    case K_ENUM: {
        Py_ssize_t i = case_index(t, value);
        if (i < 0 || write_name(p, t->names[i]) < 0) return -1;
        v[0] = K_ENUM;
        return 0;
    }
    case K_BYTES: {
        Py_buffer view;
        if (PyObject_GetBuffer(value, &view, PyBUF_SIMPLE) < 0) return -1;
        vallist_new_uninit(p, (size_t)view.len);
        uint8_t *data = ((vec_t *)p)->data;
        const uint8_t *in = view.buf;
        for (Py_ssize_t i = 0; i < view.len; i++) {
            data[i * VAL_SIZE] = K_U8;
            data[i * VAL_SIZE + 8] = in[i];
        }
        PyBuffer_Release(&view);
        v[0] = K_LIST;
        return 0;
    }
    case K_LIST: case K_TUPLE: {
        PyObject *seq = PySequence_Fast(value, "a WIT list or tuple takes a sequence");
        if (seq == NULL) return -1;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (t->kind == K_TUPLE && n != t->count) {
            PyErr_Format(PyExc_ValueError, "a tuple of %zd values was expected, not %zd",
                         t->count, n);
            Py_DECREF(seq);
            return -1;
        }
        uint8_t *data = new_elements(v, t->kind, (size_t)n);
        PyObject **items = PySequence_Fast_ITEMS(seq);
        for (Py_ssize_t i = 0; i < n; i++) {
            const Type *item = t->kind == K_LIST ? t->items[0] : t->items[i];
            if (lower(item, items[i], data + i * VAL_SIZE, ctx, res, false) < 0) {
                Py_DECREF(seq);
                unlower(t, v, ctx);
                return -1;
            }
        }
        Py_DECREF(seq);
        return 0;
    }
    case K_RECORD: {
        uint8_t *data = new_elements(v, K_RECORD, (size_t)t->count);
        for (Py_ssize_t i = 0; i < t->count; i++) {
            uint8_t *entry = data + i * RECORD_ENTRY_SIZE;
            PyObject *field = PyObject_CallMethodOneArg(value, s_get, t->names[i]);
            int failed = field == NULL || write_name(entry, t->names[i]) < 0
                || lower(t->items[i], field, entry + NAME_SIZE, ctx, res, false) < 0;
            Py_XDECREF(field);
            if (failed) {
                unlower(t, v, ctx);
                return -1;
            }
        }
        return 0;
    }
    case K_OPTION: {
        void *payload = NULL;
        if (value != Py_None && (payload = boxed(t->items[0], value, ctx, res)) == NULL)
            return -1;
        *(void **)p = payload;
        v[0] = K_OPTION;
        return 0;
    }
    case K_RESULT: {
        bool is_err = PyObject_TypeCheck(value, (PyTypeObject *)Err);
        PyObject *payload = value;
        if (is_err || !top_level_result) {
            payload = PyObject_GetAttr(value, s_value);
            if (payload == NULL) return -1;
        } else {
            Py_INCREF(payload);
        }
        const Type *payload_type = t->items[is_err ? 1 : 0];
        void *box = NULL;
        if (payload_type != NULL) box = boxed(payload_type, payload, ctx, res);
        Py_DECREF(payload);
        if (payload_type != NULL && box == NULL) return -1;
        *p = !is_err;
        *(void **)(p + 8) = box;
        v[0] = K_RESULT;
        return 0;
    }
    case K_VARIANT: {
        PyObject *name = value, *payload = NULL;
        if (!PyUnicode_Check(value)) {
            if (!PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 2) {
                PyErr_SetString(PyExc_TypeError, "a WIT variant is a case name or (name, payload)");
                return -1;
            }
            name = PyTuple_GET_ITEM(value, 0);
            payload = PyTuple_GET_ITEM(value, 1);
        }
        Py_ssize_t i = case_index(t, name);
        if (i < 0 || write_name(p, t->names[i]) < 0) return -1;
        *(void **)(p + NAME_SIZE) = NULL;
        v[0] = K_VARIANT;
        if (t->items[i] != NULL) {
            void *box = boxed(t->items[i], payload ? payload : Py_None, ctx, res);
            if (box == NULL) {
                unlower(t, v, ctx);
                return -1;
            }
            *(void **)(p + NAME_SIZE) = box;
        }
        return 0;
    }
    case K_FLAGS: {
        PyObject *seq = PySequence_Fast(value, "WIT flags take a set of names");
        if (seq == NULL) return -1;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        uint8_t *data = new_elements(v, K_FLAGS, (size_t)n);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (write_name(data + i * NAME_SIZE, PySequence_Fast_GET_ITEM(seq, i)) < 0) {
                Py_DECREF(seq);
                unlower(t, v, ctx);
                return -1;
            }
        }
        Py_DECREF(seq);
        return 0;
    }
    case K_OWN: return lower_own(value, v, ctx, res);
    }
    PyErr_Format(PyExc_NotImplementedError, "no host support for returning value kind %d",
                 t->kind);
    return -1;
}

static int lower(const Type *t, PyObject *value, uint8_t *v, void *ctx, PyObject *res,
                 bool top_level_result) {
    if (lower_value(t, value, v, ctx, res, top_level_result) == 0) return 0;
    forget(v); /* (what was made is released; a scalar may have left its kind) */
    return -1;
}

/* ------------------------------------------------------------------------------------------ */
/* HostFunction: one imported function bound to a Python callable, with its types */

typedef struct {
    PyObject_HEAD
    PyObject *name;        /* "wasi:io/streams@0.2.9#[method]output-stream.write", for messages */
    PyObject *func;
    Py_ssize_t nparams;
    Type **params;
    Type *result;          /* NULL: returns nothing */
    bool pass_store;       /* functions (not methods) get the Store's state first */
} HostFunction;

static void HostFunction_dealloc(HostFunction *self) {
    for (Py_ssize_t i = 0; i < self->nparams; i++) type_free(self->params[i]);
    PyMem_Free(self->params);
    type_free(self->result);
    Py_XDECREF(self->name);
    Py_XDECREF(self->func);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int HostFunction_init(HostFunction *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"name", "func", "params", "result", "pass_store", NULL};
    PyObject *name, *func, *params, *result;
    int pass_store;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UOO!Op", keywords, &name, &func,
                                     &PyTuple_Type, &params, &result, &pass_store))
        return -1;
    if (self->params != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a HostFunction is initialized once");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(params);
    self->params = PyMem_Calloc(n ? n : 1, sizeof(Type *));
    if (self->params == NULL) { PyErr_NoMemory(); return -1; }
    self->nparams = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        self->params[i] = type_from_spec(PyTuple_GET_ITEM(params, i));
        if (self->params[i] == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a parameter needs a type");
            return -1;
        }
    }
    self->result = type_from_spec(result);
    if (self->result == NULL && PyErr_Occurred()) return -1;
    Py_INCREF(name);
    self->name = name;
    Py_INCREF(func);
    self->func = func;
    self->pass_store = pass_store;
    return 0;
}

static PyMemberDef HostFunction_members[] = {
    {"name", T_OBJECT_EX, offsetof(HostFunction, name), READONLY, "the import's full name"},
    {"func", T_OBJECT_EX, offsetof(HostFunction, func), 0, "the Python callable"},
    {NULL},
};

static PyTypeObject HostFunctionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wasisup.wasi._hostcall.HostFunction",
    .tp_doc = "HostFunction(name, func, params, result, pass_store): an import bound to func.",
    .tp_basicsize = sizeof(HostFunction),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)HostFunction_init,
    .tp_dealloc = (destructor)HostFunction_dealloc,
    .tp_members = HostFunction_members,
};

/* ------------------------------------------------------------------------------------------ */
/* The trampoline */

/* A wasmtime error (a trap in the guest) with message `text`, which this consumes. */
static void *trap_error(PyObject *text) {
    const char *utf8 = text ? PyUnicode_AsUTF8(text) : NULL;
    void *error = error_new(utf8 ? utf8 : "host function failed");
    Py_XDECREF(text);
    PyErr_Clear();
    return error;
}

/* The current exception as the message of a trap: Trap and Err keep their message, anything
 * else is logged. Never NULL; no exception is left set. */
static PyObject *failure_message(HostFunction *fn) {
    PyObject *exc = take_exception();
    PyObject *text;
    if (exc != NULL && PyObject_TypeCheck(exc, (PyTypeObject *)Trap)) {
        text = PyUnicode_FromFormat("%U: %S", fn->name, exc);
    } else if (exc != NULL && PyObject_TypeCheck(exc, (PyTypeObject *)Err)) {
        PyObject *value = PyObject_GetAttr(exc, s_value);
        text = value ? PyUnicode_FromFormat("%U: error %R", fn->name, value) : NULL;
        Py_XDECREF(value);
    } else {
        PyObject *logged = PyObject_CallFunctionObjArgs(on_failure, fn->name,
                                                        exc ? exc : Py_None, NULL);
        if (logged == NULL) PyErr_WriteUnraisable(on_failure);
        Py_XDECREF(logged);
        text = PyUnicode_FromFormat("host function %U failed", fn->name);
    }
    Py_XDECREF(exc);
    PyErr_Clear();
    return text ? text : PyUnicode_FromString("host function failed");
}

/* The Store's host state (a new reference), or NULL with an exception set. */
static PyObject *store_state(void *ctx) {
    PyObject *key = PyLong_FromVoidPtr(ctx);
    if (key == NULL) return NULL;
    PyObject *res = PyDict_GetItemWithError(stores, key); /* borrowed */
    Py_DECREF(key);
    if (res == NULL && !PyErr_Occurred()) PyErr_SetString(Trap, "no host state for this Store");
    return Py_XNewRef(res);
}

/* Lift the arguments and call the Python function: what it returned (a new reference; an Err
 * raised for a result's error case counts as returned), or NULL with an exception set. */
static PyObject *invoke(HostFunction *fn, void *ctx, PyObject *res, const uint8_t *args) {
    PyObject *stack[16], **argv = stack;
    Py_ssize_t argc = fn->nparams + fn->pass_store, lifted = 0;
    if (argc > 16 && (argv = PyMem_Malloc(argc * sizeof(PyObject *))) == NULL)
        return PyErr_NoMemory();
    PyObject *value = NULL;
    if (fn->pass_store) argv[lifted++] = Py_NewRef(res);
    for (Py_ssize_t i = 0; i < fn->nparams; i++, lifted++) {
        argv[lifted] = lift(fn->params[i], args + i * VAL_SIZE, ctx, res);
        if (argv[lifted] == NULL) goto done;
    }
    value = PyObject_Vectorcall(fn->func, argv, (size_t)argc, NULL);
done:
    for (Py_ssize_t i = 0; i < lifted; i++) Py_DECREF(argv[i]);
    if (argv != stack) PyMem_Free(argv);
    return value;
}

/* What a finished call returned: `value`, or the Err a result's error case was raised as. */
static PyObject *returned(HostFunction *fn, PyObject *value) {
    if (value == NULL && fn->result != NULL && fn->result->kind == K_RESULT
        && PyErr_ExceptionMatches(Err))
        return take_exception(); /* lowered as the error case */
    return value;
}

/* Write a finished call's result (consumed) for the guest: NULL, or the message of the trap it
 * must be instead (the call failed, or its result cannot be handed over). */
static PyObject *deliver(HostFunction *fn, PyObject *value, void *ctx, PyObject *res,
                         uint8_t *results) {
    value = returned(fn, value);
    PyObject *text = NULL;
    if (value == NULL || (fn->result != NULL && lower(fn->result, value, results, ctx, res, true) < 0))
        text = failure_message(fn);
    Py_XDECREF(value);
    return text;
}

static void *trampoline(void *data, void *ctx, const void *type, const uint8_t *args,
                        size_t nargs, uint8_t *results, size_t nresults) {
    (void)type, (void)nargs, (void)nresults;
    HostFunction *fn = data;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *res = store_state(ctx), *text;
    if (res == NULL) {
        text = failure_message(fn);
    } else {
        text = deliver(fn, invoke(fn, ctx, res, args), ctx, res, results);
        Py_DECREF(res);
    }
    void *error = text ? trap_error(text) : NULL;
    PyGILState_Release(gil);
    return error;
}

/* ------------------------------------------------------------------------------------------ */
/* Host functions that wait: the guest runs on a fiber (a call future) and is suspended while
 * the host waits.
 *
 * A Python function that may wait is a generator function: it yields where it would block,
 * having told the loop what it waits for (wasi/io.py), and returns its result. The async
 * trampoline starts it; if it yields, wasmtime gets a continuation that resumes it each time
 * the loop polls the guest's call future, until it returns. The continuation has no way to
 * trap the guest, so a failure there (the function raised, or its result cannot be handed
 * over) is recorded on the Store's host state as `failed` and the guest stays suspended: the
 * loop sees it and drops the call future. */

typedef struct {
    bool (*callback)(void *env);
    void *env;
    void (*finalizer)(void *env);
} Continuation; /* wasmtime_async_continuation_t */

typedef struct {
    HostFunction *fn;
    PyObject *gen;   /* NULL once it has returned */
    PyObject *res;
    void *ctx;       /* the Store's context: valid while its call future lives */
    uint8_t *results;
} Waiting;

static PyObject *s_failed;

static bool ready_now(void *env) { (void)env; return true; }

static void fail_later(PyObject *res, PyObject *text) {
    if (PyObject_SetAttr(res, s_failed, text) < 0) PyErr_WriteUnraisable(res);
    Py_DECREF(text);
}

static bool resume(void *env) {
    Waiting *w = env;
    if (w->gen == NULL) return false; /* failed: the loop drops the call */
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *value;
    PySendResult sent = PyIter_Send(w->gen, Py_None, &value);
    bool done = false;
    if (sent == PYGEN_NEXT) {
        Py_DECREF(value);
    } else {
        Py_CLEAR(w->gen);
        PyObject *text = deliver(w->fn, sent == PYGEN_RETURN ? value : NULL, w->ctx, w->res,
                                 w->results);
        if (text) fail_later(w->res, text);
        else done = true;
    }
    PyGILState_Release(gil);
    return done;
}

static void finalize(void *env) {
    Waiting *w = env;
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_XDECREF(w->gen); /* a generator dropped while it waits runs its `finally` blocks */
    Py_DECREF(w->res);
    Py_DECREF((PyObject *)w->fn);
    PyMem_Free(w);
    PyGILState_Release(gil);
}

static void async_trampoline(void *data, void *ctx, const void *type, const uint8_t *args,
                             size_t nargs, uint8_t *results, size_t nresults, void **error_out,
                             Continuation *continuation) {
    (void)type, (void)nargs, (void)nresults;
    HostFunction *fn = data;
    *continuation = (Continuation){ready_now, NULL, NULL};
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *res = store_state(ctx), *text;
    if (res == NULL) {
        *error_out = trap_error(failure_message(fn));
        PyGILState_Release(gil);
        return;
    }
    PyObject *value = invoke(fn, ctx, res, args);
    if (value != NULL && PyGen_Check(value)) {
        PyObject *gen = value;
        PySendResult sent = PyIter_Send(gen, Py_None, &value);
        Waiting *w;
        if (sent == PYGEN_NEXT && (w = PyMem_Malloc(sizeof(Waiting))) != NULL) {
            Py_DECREF(value);
            *w = (Waiting){(HostFunction *)Py_NewRef((PyObject *)fn), gen, Py_NewRef(res), ctx,
                           results};
            *continuation = (Continuation){resume, w, finalize};
            Py_DECREF(res);
            PyGILState_Release(gil);
            return;
        }
        if (sent == PYGEN_NEXT) { /* (no memory for the continuation) */
            Py_DECREF(value);
            PyErr_NoMemory();
        }
        Py_DECREF(gen);
        if (sent != PYGEN_RETURN) value = NULL;
    }
    text = deliver(fn, value, ctx, res, results);
    if (text) *error_out = trap_error(text);
    Py_DECREF(res);
    PyGILState_Release(gil);
}

/* ------------------------------------------------------------------------------------------ */
/* CallFuture: the guest's incoming handler, called on a fiber and driven by the loop */

typedef struct {
    PyObject_HEAD
    void *future;          /* wasmtime_call_future_t; NULL once finished or dropped */
    void *error;           /* the wasmtime_error_t the call failed with, until taken */
    PyObject *keep;        /* what the call reads: the function's struct, the Store's state */
    void *ctx;
    _Alignas(8) uint8_t params[2 * VAL_SIZE]; /* read by the call's first poll */
} CallFuture;

static void CallFuture_release(CallFuture *self) {
    if (self->future != NULL) {
        future_delete(self->future); /* a suspended guest is unwound; its continuations finalized */
        self->future = NULL;
    }
    if (self->keep != NULL) {
        val_delete(self->params); /* the call copied them: the handles are still ours to drop */
        val_delete(self->params + VAL_SIZE);
        forget(self->params);
        forget(self->params + VAL_SIZE);
        Py_CLEAR(self->keep);
    }
}

static void CallFuture_dealloc(CallFuture *self) {
    CallFuture_release(self);
    if (self->error != NULL) error_delete(self->error);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *CallFuture_poll(CallFuture *self, PyObject *unused) {
    if (self->future == NULL) Py_RETURN_TRUE;
    bool done;
    Py_BEGIN_ALLOW_THREADS
    done = future_poll(self->future);
    Py_END_ALLOW_THREADS
    if (!done) Py_RETURN_FALSE;
    CallFuture_release(self);
    Py_RETURN_TRUE;
}

static PyObject *CallFuture_close(CallFuture *self, PyObject *unused) {
    CallFuture_release(self);
    Py_RETURN_NONE;
}

static PyObject *CallFuture_take_error(CallFuture *self, PyObject *unused) {
    if (self->error == NULL) Py_RETURN_NONE;
    void *error = self->error;
    self->error = NULL;
    return PyLong_FromVoidPtr(error);
}

static PyMethodDef CallFuture_methods[] = {
    {"poll", (PyCFunction)CallFuture_poll, METH_NOARGS,
     "Run the guest until it returns (True) or waits (False); the GIL is released meanwhile."},
    {"close", (PyCFunction)CallFuture_close, METH_NOARGS,
     "Drop the call: a suspended guest is unwound, its waits finalized."},
    {"take_error", (PyCFunction)CallFuture_take_error, METH_NOARGS,
     "The address of the wasmtime error the finished call failed with (now the caller's), or None."},
    {NULL},
};

static PyTypeObject CallFutureType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "wasisup.wasi._hostcall.CallFuture",
    .tp_doc = "A guest call in flight (see start_call).",
    .tp_basicsize = sizeof(CallFuture),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)CallFuture_dealloc,
    .tp_methods = CallFuture_methods,
};

/* A guest dropped a handle to a host resource: abi.py releases the table entry. */
static void *resource_dtor(void *data, void *ctx, uint32_t rep) {
    (void)data;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *done = PyObject_CallFunction(on_drop, "NI", PyLong_FromVoidPtr(ctx),
                                           (unsigned int)rep);
    if (done == NULL) PyErr_WriteUnraisable(on_drop);
    Py_XDECREF(done);
    PyGILState_Release(gil);
    return NULL;
}

static void no_finalizer(void *data) { (void)data; }

/* ------------------------------------------------------------------------------------------ */
/* Module */

/* Start a guest function taking two owned resources and returning nothing (the incoming
 * handler) as a call future: start_call(func, ctx, first, second, state), where func is the
 * wasmtime_component_func_t (a ctypes struct: anything with its bytes as a buffer). */
static PyObject *start_call(PyObject *module, PyObject *args) {
    unsigned long long ctx;
    PyObject *func, *first, *second, *res;
    if (!PyArg_ParseTuple(args, "OKOOO", &func, &ctx, &first, &second, &res)) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(func, &view, PyBUF_SIMPLE) < 0) return NULL;
    void *func_ptr = view.buf;
    PyBuffer_Release(&view); /* (`keep` holds the object, so its bytes stay where they are) */
    CallFuture *self = PyObject_New(CallFuture, &CallFutureType);
    if (self == NULL) return NULL;
    self->future = self->error = NULL;
    self->ctx = (void *)(uintptr_t)ctx;
    memset(self->params, 0, sizeof self->params);
    self->keep = PyTuple_Pack(2, func, res);
    if (self->keep == NULL) { Py_DECREF(self); return NULL; }
    if (lower_own(first, self->params, self->ctx, res) < 0) { Py_DECREF(self); return NULL; }
    if (lower_own(second, self->params + VAL_SIZE, self->ctx, res) < 0) {
        static const Type own = {.kind = K_OWN, .owns = true};
        unlower(&own, self->params, self->ctx);
        Py_DECREF(self);
        return NULL;
    }
    self->future = func_call_async(func_ptr, self->ctx, self->params, 2, NULL, 0, &self->error);
    return (PyObject *)self;
}

/* Fill `slot` with wasmtime's function `name`, as `address(name)` finds it. */
static int take_symbol(PyObject *address, const char *name, void **slot) {
    PyObject *found = PyObject_CallFunction(address, "s", name);
    if (found == NULL) return -1;
    *slot = PyLong_AsVoidPtr(found);
    Py_DECREF(found);
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *setup(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"address", "ok", "err", "trap", "stores", "on_failure", "on_drop",
                               NULL};
    PyObject *address, *ok, *err, *trap, *stores_dict, *failed, *dropped;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO!OO", keywords, &address, &ok, &err,
                                     &trap, &PyDict_Type, &stores_dict, &failed, &dropped))
        return NULL;
    struct { const char *name; void **slot; } table[] = {
        {"wasm_byte_vec_new", (void **)&byte_vec_new},
        {"wasmtime_component_vallist_new_uninit", (void **)&vallist_new_uninit},
        {"wasmtime_component_valtuple_new_uninit", (void **)&valtuple_new_uninit},
        {"wasmtime_component_valrecord_new_uninit", (void **)&valrecord_new_uninit},
        {"wasmtime_component_valflags_new_uninit", (void **)&valflags_new_uninit},
        {"wasmtime_component_val_new", (void **)&val_new},
        {"wasmtime_component_resource_host_new", (void **)&host_new},
        {"wasmtime_component_resource_host_rep", (void **)&host_rep},
        {"wasmtime_component_resource_host_delete", (void **)&host_delete},
        {"wasmtime_component_resource_any_to_host", (void **)&any_to_host},
        {"wasmtime_component_resource_host_to_any", (void **)&host_to_any},
        {"wasmtime_error_new", (void **)&error_new},
        {"wasmtime_error_delete", (void **)&error_delete},
        {"wasmtime_component_func_call_async", (void **)&func_call_async},
        {"wasmtime_call_future_poll", (void **)&future_poll},
        {"wasmtime_call_future_delete", (void **)&future_delete},
        {"wasmtime_component_val_delete", (void **)&val_delete},
        {"wasmtime_component_val_free", (void **)&val_free},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (take_symbol(address, table[i].name, table[i].slot) < 0) return NULL;
    }
    Py_XSETREF(Ok, Py_NewRef(ok));
    Py_XSETREF(Err, Py_NewRef(err));
    Py_XSETREF(Trap, Py_NewRef(trap));
    Py_XSETREF(stores, Py_NewRef(stores_dict));
    Py_XSETREF(on_failure, Py_NewRef(failed));
    Py_XSETREF(on_drop, Py_NewRef(dropped));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"setup", (PyCFunction)(void (*)(void))setup, METH_VARARGS | METH_KEYWORDS,
     "setup(address, ok, err, trap, stores, on_failure, on_drop): address(name) finds each "
     "wasmtime C API function this module calls; then the Python side's classes and hooks. "
     "Called once, by abi.py."},
    {"start_call", start_call, METH_VARARGS,
     "start_call(func, ctx, first, second, state): start the guest function func (its "
     "wasmtime_component_func_t) in the Store whose context is at ctx with own<first> and "
     "own<second>, as a CallFuture."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_hostcall", "The host-call trampoline (see _hostcall.c).", -1, methods,
};

/* The kinds a type spec starts with, as module constants: abi.py builds specs with them. */
static const struct { const char *name; int kind; } SPEC_KINDS[] = {
    {"K_BOOL", K_BOOL}, {"K_S8", K_S8}, {"K_U8", K_U8}, {"K_S16", K_S16}, {"K_U16", K_U16},
    {"K_S32", K_S32}, {"K_U32", K_U32}, {"K_S64", K_S64}, {"K_U64", K_U64}, {"K_F32", K_F32},
    {"K_F64", K_F64}, {"K_CHAR", K_CHAR}, {"K_STRING", K_STRING}, {"K_LIST", K_LIST},
    {"K_RECORD", K_RECORD}, {"K_TUPLE", K_TUPLE}, {"K_VARIANT", K_VARIANT}, {"K_ENUM", K_ENUM},
    {"K_OPTION", K_OPTION}, {"K_RESULT", K_RESULT}, {"K_FLAGS", K_FLAGS}, {"K_BYTES", K_BYTES},
    {"K_BORROW", K_BORROW}, {"K_OWN", K_OWN},
};

/* The layout of wasmtime's values this module assumes (capi.py checks it against wasmtime-py's). */
static const struct { const char *name; long value; } LAYOUT[] = {
    {"VAL_SIZE", VAL_SIZE}, {"RECORD_ENTRY_SIZE", RECORD_ENTRY_SIZE}, {"NAME_SIZE", NAME_SIZE},
    {"K_RESOURCE", K_RESOURCE},
};

PyMODINIT_FUNC PyInit__hostcall(void) {
    if (PyType_Ready(&HostFunctionType) < 0 || PyType_Ready(&CallFutureType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) return NULL;
    for (size_t i = 0; i < sizeof SPEC_KINDS / sizeof SPEC_KINDS[0]; i++) {
        if (PyModule_AddIntConstant(m, SPEC_KINDS[i].name, SPEC_KINDS[i].kind) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    for (size_t i = 0; i < sizeof LAYOUT / sizeof LAYOUT[0]; i++) {
        if (PyModule_AddIntConstant(m, LAYOUT[i].name, LAYOUT[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    s_get = PyUnicode_InternFromString("get");
    s_remove = PyUnicode_InternFromString("remove");
    s_add = PyUnicode_InternFromString("add");
    s_value = PyUnicode_InternFromString("value");
    s_resource_id = PyUnicode_InternFromString("resource_id");
    s_failed = PyUnicode_InternFromString("failed");
    if (!s_get || !s_remove || !s_add || !s_value || !s_resource_id || !s_failed
        || PyModule_AddObjectRef(m, "HostFunction", (PyObject *)&HostFunctionType) < 0
        || PyModule_AddObjectRef(m, "CallFuture", (PyObject *)&CallFutureType) < 0
        || PyModule_AddObject(m, "TRAMPOLINE", PyLong_FromVoidPtr((void *)trampoline)) < 0
        || PyModule_AddObject(m, "ASYNC_TRAMPOLINE", PyLong_FromVoidPtr((void *)async_trampoline)) < 0
        || PyModule_AddObject(m, "RESOURCE_DTOR", PyLong_FromVoidPtr((void *)resource_dtor)) < 0
        || PyModule_AddObject(m, "NO_FINALIZER", PyLong_FromVoidPtr((void *)no_finalizer)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
