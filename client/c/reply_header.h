/*
 * reply_header.h - decoding a reply header (a frame of msgpack from a daemon or a worker) without trusting
 * what it claims.
 *
 * Internal to client/c: not part of the public API (openinfer.h).
 *
 * msgpack-c's msgpack_unpack_next allocates an array's or a map's elements for the count its head
 * claims, before reading them (16 bytes an element, 32 a pair): the 5 bytes of a map32 head claiming
 * 2^32 - 1 pairs asked malloc for 128 GiB. Here the claims are checked first, in one pass and no memory:
 * every element takes at least one byte, so a header whose containers claim more elements than it has
 * bytes left is refused, and what msgpack-c then allocates is bounded by ~32 times the header's size
 * (the callers bound that size: OI_MAX_REPLY_HEADER_BYTES, OI_MAX_OP_REPLY_HEADER_BYTES).
 */
#ifndef OPENINFER_REPLY_HEADER_H
#define OPENINFER_REPLY_HEADER_H

#include <stddef.h>

#include <msgpack.h>

/* 1 when `data` (`size` bytes) is exactly one msgpack object whose containers claim no more elements
 * than its bytes could hold: decoded into `u` (initialised here; the caller destroys it). 0 otherwise
 * (nothing allocated for the claims). */
int oi_unpack_one(msgpack_unpacked *u, const void *data, size_t size);

/* 1 when `data` is exactly one msgpack object whose claims fit its bytes (what oi_unpack_one checks). */
int oi_msgpack_claims_fit(const unsigned char *data, size_t size);

#endif /* OPENINFER_REPLY_HEADER_H */
