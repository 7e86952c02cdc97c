# C-level contract of hotpath._records: the fixed-width little-endian record
# layouts and nogil encoders/decoders.  Decoders return a RecordCheck code
# instead of raising, so they can run without the GIL; raise_check() turns a
# code into the Python exception.

from libc.stdint cimport int64_t, uint8_t, uint16_t

cdef enum:
    # envelope: <qqqqHHBBH header, then `count` x <i shares
    ENV_TOTAL = 0
    ENV_REMAINING = 8
    ENV_CREATED = 16
    ENV_EXPIRES = 24
    ENV_COUNT = 32
    ENV_CLAIMED = 34
    ENV_KIND = 36
    ENV_STATUS = 37
    ENV_FLAGS = 38
    ENV_HEADER_SIZE = 40
    ENV_SHARE_SIZE = 4
    # grab: <qqHBB4x16s
    GRAB_AMOUNT = 0
    GRAB_AT = 8
    GRAB_SHARE_INDEX = 16
    GRAB_FLAGS = 18
    GRAB_KIND = 19
    GRAB_PAD = 20
    GRAB_DIGEST = 24
    GRAB_DIGEST_SIZE = 16
    GRAB_SIZE = 40
    # transfer: <qqBBBB header, then debit, credit and ref bytes
    XFER_AMOUNT = 0
    XFER_CREATED = 8
    XFER_KIND = 16
    XFER_DEBIT_LEN = 17
    XFER_CREDIT_LEN = 18
    XFER_REF_LEN = 19
    XFER_HEADER_SIZE = 20
    XFER_FIELD_MAX = 255

cdef enum RecordCheck:
    RECORD_OK = 0
    RECORD_SHORT              # shorter than its fixed header
    RECORD_LENGTH             # length disagrees with the counts in the header
    RECORD_COUNT              # envelope count is 0
    RECORD_CLAIMED            # claimed > count
    RECORD_REMAINING          # remaining_fen outside 0..total_fen
    RECORD_SHARE              # a share below 1 fen
    RECORD_SHARE_SUM          # shares do not sum to total_fen
    RECORD_AMOUNT             # amount_fen below 1
    RECORD_RESERVED           # reserved grab bytes not zero
    RECORD_SOLD_OUT           # claim_share on an envelope with no share left
    RECORD_OVER_REMAINING     # next share exceeds remaining_fen

cdef struct EnvelopeHeader:
    int64_t total_fen
    int64_t remaining_fen
    int64_t created_at_ms
    int64_t expires_at_ms
    uint16_t count
    uint16_t claimed
    uint8_t kind
    uint8_t status
    uint16_t flags

cdef RecordCheck decode_envelope_header(const unsigned char *p, Py_ssize_t n,
                                        EnvelopeHeader *h) noexcept nogil
cdef RecordCheck check_envelope_shares(const unsigned char *p,
                                       const EnvelopeHeader *h) noexcept nogil
cdef void encode_envelope_header(unsigned char *p, const EnvelopeHeader *h) noexcept nogil
cdef RecordCheck claim_share_into(const unsigned char *src, Py_ssize_t n, unsigned char *dst,
                                  uint8_t status_sold_out, Py_ssize_t *index,
                                  int64_t *amount_fen) noexcept nogil
cdef int raise_check(RecordCheck check, str record, Py_ssize_t n) except -1
