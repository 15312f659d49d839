/*
 * reply_header.c - decode a reply header only once what it claims fits its bytes. See reply_header.h.
 */
#include "reply_header.h"

#include <stdint.h>

/* The big-endian unsigned integer of `n` bytes at `p`. */
static uint64_t be(const unsigned char *p, size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) v = v << 8 | p[i];
    return v;
}

/* Walk the objects as a count of those still owed (no stack, no recursion): each head pays for itself
 * and adds what it claims (an array's elements, a map's keys and values); a count of owed objects over
 * the bytes left is a lie, refused before anything is allocated for it. */
int oi_msgpack_claims_fit(const unsigned char *p, size_t size) {
    uint64_t owed = 1; /* the header itself */
    size_t pos = 0;
    while (owed) {
        if (pos >= size) return 0;
        unsigned b = p[pos++];
        owed--;
        uint64_t claims = 0; /* objects this head adds */
        size_t len = 0;      /* bytes of its length field ... */
        uint64_t skip = 0;   /* ... and of its body (scalars, str, bin, ext) */
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            /* fixint, nil, bool: the byte is all */
        } else if ((b & 0xf0) == 0x80) {
            claims = 2 * (uint64_t)(b & 0x0f);
        } else if ((b & 0xf0) == 0x90) {
            claims = b & 0x0f;
        } else if ((b & 0xe0) == 0xa0) {
            skip = b & 0x1f;
        } else {
            switch (b) {
            case 0xc4: case 0xd9: len = 1; break;              /* bin8, str8 */
            case 0xc5: case 0xda: len = 2; break;              /* bin16, str16 */
            case 0xc6: case 0xdb: len = 4; break;              /* bin32, str32 */
            case 0xc7: len = 1; skip = 1; break;               /* ext8: length, then type */
            case 0xc8: len = 2; skip = 1; break;
            case 0xc9: len = 4; skip = 1; break;
            case 0xcc: case 0xd0: skip = 1; break;             /* uint8, int8 */
            case 0xcd: case 0xd1: skip = 2; break;
            case 0xca: case 0xce: case 0xd2: skip = 4; break;  /* float32, uint32, int32 */
            case 0xcb: case 0xcf: case 0xd3: skip = 8; break;
            case 0xd4: skip = 2; break;                        /* fixext 1, 2, 4, 8, 16: type, then data */
            case 0xd5: skip = 3; break;
            case 0xd6: skip = 5; break;
            case 0xd7: skip = 9; break;
            case 0xd8: skip = 17; break;
            case 0xdc: case 0xde: len = 2; break;              /* array16, map16 */
            case 0xdd: case 0xdf: len = 4; break;              /* array32, map32 */
            default: return 0;                                 /* 0xc1: never used */
            }
            if (len) {
                if (size - pos < len) return 0;
                uint64_t n = be(p + pos, len);
                pos += len;
                if (b == 0xdc || b == 0xdd) claims = n;
                else if (b == 0xde || b == 0xdf) claims = 2 * n;
                else skip += n;
            }
        }
        if (skip > size - pos) return 0;
        pos += (size_t)skip;
        owed += claims;
        if (owed > size - pos) return 0; /* each owed object is at least a byte */
    }
    return pos == size;
}

int oi_unpack_one(msgpack_unpacked *u, const void *data, size_t size) {
    msgpack_unpacked_init(u);
    if (size == 0 || !oi_msgpack_claims_fit(data, size)) return 0;
    size_t off = 0;
    return msgpack_unpack_next(u, data, size, &off) == MSGPACK_UNPACK_SUCCESS && off == size;
}
