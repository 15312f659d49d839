/*
 * direct_path.h - the C client's side of the direct path (docs/PROTOCOL.md 17.6): leases per model
 * version, connections to worker endpoints, and one `infer` at a time sent straight to a worker.
 *
 * Internal to client/c (openinfer.c drives it): not part of the public API (openinfer.h).
 *
 * For each request:
 *  1. a lease for (model, version) from the cache, or from the front door (`lease`) when there is none or
 *     it is due for renewal; a refusal meaning "not here" sends the request to the front door (for good
 *     when the daemon has no direct path or does not know `lease`; for a second when it says UNAVAILABLE);
 *  2. a request over the lease's limits is refused here, RESOURCE_EXHAUSTED naming the limit;
 *  3. the next of the lease's workers, round robin, skipping those that said GOAWAY: connected (our
 *     handshake and `attach` in one write) or reused (anything it sent meanwhile read first: GOAWAY,
 *     a closed connection, late replies), with the lease attached;
 *  4. `infer` sent there and its reply awaited. PERMISSION_DENIED with details.lease "expired": a new
 *     lease, attached, and the request sent again, once (the worker did not run it). The connection
 *     closed: WORKER_CRASHED, or DEADLINE_EXCEEDED when the request's own deadline had passed (the daemon
 *     kills a worker whose run overstays it); never resent; leases naming that worker are dropped, so the
 *     next request takes a new one. GOAWAY while waiting: the reply still comes; nothing more is sent
 *     there, the connection is closed before the next request and the next request takes a new lease;
 *     closed after a GOAWAY that did not list the request as read: sent again (17.5).
 *     A request that never left (the worker was already gone) is sent again under a new lease.
 */
#ifndef OPENINFER_DIRECT_PATH_H
#define OPENINFER_DIRECT_PATH_H

#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

#include "openinfer.h"

typedef struct oi_direct oi_direct;

/* How the direct path asks the front door (openinfer.c): send `request` (one frame, id `id`) and wait
 * until `deadline_ms` for the reply with that id. OI_OK with `out` filled, or a local failure (rc and
 * out->error). */
typedef int (*oi_front_door_call)(void *client, const oi_frame *request, uint64_t id, int64_t deadline_ms, oi_reply *out);

typedef struct oi_direct_request {
    const char *model;
    int64_t version;           /* -1: newest ready */
    uint64_t id;               /* the id inside frames[0] */
    const oi_frame *frames;    /* the request exactly as for the front door */
    size_t n_frames;
    uint64_t tensor_bytes;
    int timeout_ms;            /* the request's timeout_ms */
    int64_t wait_deadline_ms;  /* when to give up waiting (CLOCK_MONOTONIC ms) */
} oi_direct_request;

/* The answer to a request: a reply whose header (a map, decoded) is in `header` and whose frames
 * (frames[0] the header bytes) stay valid until the next call on this oi_direct. */
typedef struct oi_direct_answer {
    const oi_frame *frames;
    size_t n_frames;
    int from_worker; /* 1: sent to a worker (its reply, or the failure, came from there); 0: the front
                        door's refusal of the lease (e.g. NOT_FOUND), or a request refused here */
    int64_t sent_us; /* when the request was sent (CLOCK_MONOTONIC us) */
} oi_direct_answer;

/* oi_direct_infer returns this (> 0) when the request should go through the front door. */
#define OI_DIRECT_USE_FRONT_DOOR 1

oi_direct *oi_direct_new(oi_front_door_call call, void *client, uint64_t *next_id);
void oi_direct_free(oi_direct *d);
/* 0 once the daemon said it has no direct path (or does not know `lease`): stop asking. */
int oi_direct_available(const oi_direct *d);
/* The client's own bound on a reply (oi_set_max_reply_bytes): a worker's link takes the smaller of it
 * and the lease's max_reply_bytes. */
void oi_direct_set_max_reply_bytes(oi_direct *d, uint64_t max_reply_bytes);

/*
 * Send `req` over the direct path and wait for its reply. Returns OI_OK with `answer` and `header` set,
 * OI_DIRECT_USE_FRONT_DOOR, or a local failure: OI_ERR_RESOURCE_EXHAUSTED (over the lease's limits),
 * OI_ERR_WORKER_CRASHED / OI_ERR_DEADLINE_EXCEEDED (the worker's connection closed with the request
 * outstanding), OI_ERR_TIMEOUT (no reply; a cancel was sent), OI_ERR_TRANSPORT, with `err` filled.
 * `header` must be initialised (msgpack_unpacked_init) and is destroyed and refilled here.
 */
int oi_direct_infer(oi_direct *d, const oi_direct_request *req, oi_direct_answer *answer, msgpack_unpacked *header,
                    oi_error *err);

#endif /* OPENINFER_DIRECT_PATH_H */
