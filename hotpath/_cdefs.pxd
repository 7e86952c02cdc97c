# C helpers shared by the hot-path modules: atomics, little-endian loads and
# stores, the user-key hash, the debug switch and strict int64 conversion.  Written as inline C (not
# Cython) because the atomics must map one-to-one onto GCC/Clang
# `__atomic_*` builtins, which Cython has no syntax for, and because the
# byte-order helpers compile to a single load/store on little-endian hosts.

from cpython.long cimport PyLong_CheckExact
from cpython.number cimport PyNumber_Index
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* HONGBAO_DEBUG is defined by setup.py in debug builds (HONGBAO_DEBUG=1).
       A C constant rather than Cython's deprecated compile-time IF, so the
       dead branch is removed by the C compiler in release builds. */
    #ifdef HONGBAO_DEBUG
    #define HB_DEBUG 1
    #else
    #define HB_DEBUG 0
    #endif

    /* ---- atomics: sequentially consistent is cheap enough here (one
       locked instruction on x86) and leaves no ordering puzzles. */
    static inline int64_t hb_load_i64(int64_t *p) {
        return __atomic_load_n(p, __ATOMIC_SEQ_CST);
    }
    static inline void hb_store_i64(int64_t *p, int64_t v) {
        __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
    }
    static inline int64_t hb_fetch_add_i64(int64_t *p, int64_t v) {
        return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    }
    static inline int hb_cas_i64(int64_t *p, int64_t expected, int64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                           __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    static inline uint64_t hb_load_u64(uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_SEQ_CST);
    }
    static inline int hb_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                           __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }

    /* ---- little-endian fixed-width fields (the on-disk record format). */
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    #define HB_LE64(v) __builtin_bswap64(v)
    #define HB_LE32(v) __builtin_bswap32(v)
    #define HB_LE16(v) __builtin_bswap16(v)
    #else
    #define HB_LE64(v) (v)
    #define HB_LE32(v) (v)
    #define HB_LE16(v) (v)
    #endif
    static inline uint64_t hb_get_u64(const unsigned char *p) {
        uint64_t v; memcpy(&v, p, 8); return HB_LE64(v);
    }
    static inline uint32_t hb_get_u32(const unsigned char *p) {
        uint32_t v; memcpy(&v, p, 4); return HB_LE32(v);
    }
    static inline uint16_t hb_get_u16(const unsigned char *p) {
        uint16_t v; memcpy(&v, p, 2); return HB_LE16(v);
    }
    static inline void hb_put_u64(unsigned char *p, uint64_t v) {
        v = HB_LE64(v); memcpy(p, &v, 8);
    }
    static inline void hb_put_u32(unsigned char *p, uint32_t v) {
        v = HB_LE32(v); memcpy(p, &v, 4);
    }
    static inline void hb_put_u16(unsigned char *p, uint16_t v) {
        v = HB_LE16(v); memcpy(p, &v, 2);
    }

    /* ---- checked int64 addition (money never wraps). */
    static inline int hb_add_overflows(int64_t a, int64_t b, int64_t *out) {
        return __builtin_add_overflow(a, b, out);
    }

    /* ---- user-key hash: FNV-1a 64 over the bytes, then the murmur3 fmix64
       finaliser so the low bits used to index the table are well mixed.
       Fixed (not seeded per process) so every worker agrees; it is not
       collision resistant, which is harmless (see GrabGate). */
    static inline uint64_t hb_hash64(const unsigned char *p, Py_ssize_t n) {
        uint64_t h = 0xcbf29ce484222325ULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            h ^= p[i];
            h *= 0x100000001b3ULL;
        }
        h ^= h >> 33; h *= 0xff51afd7ed558ccdULL;
        h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL;
        h ^= h >> 33;
        return h;
    }
    """
    const bint HB_DEBUG

    int64_t hb_load_i64(int64_t *p) nogil
    void hb_store_i64(int64_t *p, int64_t v) nogil
    int64_t hb_fetch_add_i64(int64_t *p, int64_t v) nogil
    bint hb_cas_i64(int64_t *p, int64_t expected, int64_t desired) nogil
    uint64_t hb_load_u64(uint64_t *p) nogil
    bint hb_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired) nogil

    uint64_t hb_get_u64(const unsigned char *p) nogil
    uint32_t hb_get_u32(const unsigned char *p) nogil
    uint16_t hb_get_u16(const unsigned char *p) nogil
    void hb_put_u64(unsigned char *p, uint64_t v) nogil
    void hb_put_u32(unsigned char *p, uint32_t v) nogil
    void hb_put_u16(unsigned char *p, uint16_t v) nogil

    bint hb_add_overflows(int64_t a, int64_t b, int64_t *out) nogil
    uint64_t hb_hash64(const unsigned char *p, Py_ssize_t n) nogil


cdef inline int64_t as_i64(object value) except? -1:
    # Cython converts a float argument to a C integer by truncating it; money
    # must refuse floats instead (TypeError), as operator.index() does in the
    # pure twin.  Out-of-range ints still raise OverflowError.
    if not PyLong_CheckExact(value):
        value = PyNumber_Index(value)
    return value
