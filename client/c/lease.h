/*
 * lease.h - what a client of the direct path (docs/PROTOCOL.md 17) needs to know about leases and the
 * messages around them: the front door's `lease` request and result, `attach`, the worker's answers
 * that need action (lease expired, GOAWAY) and the limits a lease reports.
 *
 * Internal to client/c and bench/cwire: not part of the public API (openinfer.h). The decisions (when to
 * renew, which worker, what to do with a lost worker) are each user's: openinfer.c, one request at a
 * time; bench/cwire/cwire.c, many in flight.
 */
#ifndef OPENINFER_LEASE_H
#define OPENINFER_LEASE_H

#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

/* A lease is renewed this long before it expires (PROTOCOL.md 17.1: "about a second"), or half its
 * lifetime when that is shorter (a daemon with server.lease_ttl_s = 1 would otherwise be asked for a
 * lease before every request). */
#define OI_LEASE_RENEW_BEFORE_NS 1000000000LL

/* The daemon's server.max_worker_message_bytes by default: the bound its front door puts on the same reply. */
#define OI_DEFAULT_MAX_REPLY_BYTES ((uint64_t)1 << 30)

typedef struct oi_lease {
    char *model;               /* the model version leased */
    int64_t version;
    unsigned char *token;      /* the opaque `lease` bytes, for `attach` */
    size_t token_size;
    int64_t expires_ns;        /* CLOCK_MONOTONIC; counted from before the request was sent (never late) */
    int64_t renew_ns;          /* when to take the next one */
    char **addresses;          /* worker endpoints, "ipc://..." */
    size_t n_addresses;
    uint64_t max_request_bytes; /* limits: tensor bytes, header bytes, frames of one request */
    uint64_t max_header_bytes;
    uint64_t max_frames;
    uint64_t max_reply_bytes;  /* the largest reply a worker may send (OI_DEFAULT_MAX_REPLY_BYTES when the daemon names none) */
    uint64_t max_compute_ms;   /* the model's ceiling on one run (0: not named): a run that long gets its worker killed */
    uint64_t serial;           /* set by the user: tells links which lease they attached */
} oi_lease;

/* The value of str key `key` in `map`, or NULL (absent; keys packed as bin never match). */
const msgpack_object *oi_map_get(const msgpack_object *map, const char *key);
int oi_obj_is_str(const msgpack_object *o, const char *s);

/* Pack `{"v": 1, "id": id, "op": "lease", "model": model[, "version": version]}` (version < 0: none). */
void oi_pack_lease_request(msgpack_packer *pk, uint64_t id, const char *model, int64_t version);
/* Pack `{"v": 1, "id": id, "op": "attach", "lease": <token>}`. */
void oi_pack_attach(msgpack_packer *pk, uint64_t id, const oi_lease *lease);

/* Parse the `result` map of a `lease` reply; `asked_ns` is when the request was sent. 0, or -1 when
 * the result is not a lease (the caller uses the front door), -2 out of memory. */
int oi_lease_parse(const msgpack_object *result, int64_t asked_ns, oi_lease *out);
void oi_lease_free(oi_lease *lease);
int oi_lease_names(const oi_lease *lease, const char *address);

/* What a refusal of `lease` (its `error` map) means for the client. */
enum {
    OI_LEASE_REFUSED_REPORT = 0, /* the caller's error (NOT_FOUND, PERMISSION_DENIED, ...): report it */
    OI_LEASE_REFUSED_NOW = 1,    /* UNAVAILABLE: not now (model not ready for direct requests): front door */
    OI_LEASE_REFUSED_EVER = 2    /* an older daemon (INVALID_ARGUMENT, unknown operation) or
                                    UNAVAILABLE with details.direct = "off": front door, stop asking */
};
int oi_lease_refusal(const msgpack_object *error);

/* A reply header that is PERMISSION_DENIED with details.lease == "expired" (17.3, 17.4). */
int oi_reply_lease_expired(const msgpack_object *header);
/* An unsolicited GOAWAY from a worker: {"v": 1, "id": nil, "goaway": true, ...} (17.5). */
int oi_reply_is_goaway(const msgpack_object *header);
/* Whether a GOAWAY lists request `id` in its "read": the worker had read it, may have run it, and answers
 * it before it closes unless it dies (17.5). Then a close with it unanswered fails it: never sent again. */
int oi_goaway_lists(const msgpack_object *header, uint64_t id);

/* 0 when a request of these sizes fits the lease's limits; else writes why (naming the limit) into
 * `why` and returns -1 (the caller answers RESOURCE_EXHAUSTED itself, 17.1). */
int oi_lease_check_size(const oi_lease *lease, size_t header_bytes, size_t n_frames, uint64_t tensor_bytes, char *why,
                        size_t why_size);

#endif /* OPENINFER_LEASE_H */
