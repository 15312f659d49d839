/*
 * direct_path.c - leases, worker connections and one request at a time on the direct path. See
 * direct_path.h (the rules) and docs/PROTOCOL.md 17.
 */
#define _POSIX_C_SOURCE 200809L

#include "direct_path.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lease.h"
#include "reply_header.h"
#include "zmtp_link.h"

#define MAX_LEASES 16              /* (model, version) pairs whose lease is kept */
#define MAX_LINKS 32               /* worker connections kept open */
#define NOT_NOW_NS 1000000000LL    /* after `lease` said UNAVAILABLE: the front door for this long */
#define ATTEMPTS 4                 /* leases taken for one request, at most */
#define CANCEL_WAIT_MS 100
/* A client stays with the worker that answered its last request (at c=1 that worker is still awake and
 * warm: ~40-90 us less per request here than alternating), unless that request waited this long in
 * the worker's queue (timing.queue_us): then other clients keep that worker busy, and the next request
 * goes to the next worker. Under load that is round robin; clients start at random workers. */
#define MOVE_ON_QUEUE_US 100.0

enum { RETRY = 2 }; /* internal: take a new lease and try again */

typedef struct lease_slot {
    char *model;     /* the key: the model and version asked for (-1: newest) */
    int64_t version;
    int has_lease;
    oi_lease lease;
    int64_t not_before_ns; /* refused (UNAVAILABLE): do not ask again before this */
    int64_t used_ns;
} lease_slot;

struct oi_direct {
    oi_front_door_call call;
    void *client;
    uint64_t *next_id;
    int off; /* the daemon has no direct path: front door for good */
    lease_slot slots[MAX_LEASES];
    size_t n_slots;
    oi_link *links[MAX_LINKS];
    size_t n_links;
    uint64_t max_reply_bytes; /* the client's own bound: a lease's is taken only when smaller */
    uint64_t serial; /* of the last lease taken */
    size_t turn;     /* which of a lease's workers is next (MOVE_ON_QUEUE_US) */
    oi_reply refusal; /* the front door's refusal of a lease, when it is the answer */
};

static int fail(oi_error *err, int rc, const char *code, const char *fmt, ...) {
    err->local = 1;
    snprintf(err->code, sizeof err->code, "%s", code);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return rc;
}

oi_direct *oi_direct_new(oi_front_door_call call, void *client, uint64_t *next_id) {
    oi_direct *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    d->call = call;
    d->client = client;
    d->next_id = next_id;
    d->max_reply_bytes = UINT64_MAX;
    d->turn = (size_t)(*next_id >> 7); /* random (the ids start at a random value): clients spread out */
    return d;
}

int oi_direct_available(const oi_direct *d) { return d && !d->off; }

void oi_direct_set_max_reply_bytes(oi_direct *d, uint64_t max_reply_bytes) { d->max_reply_bytes = max_reply_bytes; }

/* ---- links ------------------------------------------------------------------------------------- */

static oi_link *find_link(oi_direct *d, const char *address) {
    for (size_t i = 0; i < d->n_links; i++)
        if (strcmp(d->links[i]->address, address) == 0) return d->links[i];
    return NULL;
}

static void close_link(oi_direct *d, oi_link *link) {
    for (size_t i = 0; i < d->n_links; i++)
        if (d->links[i] == link) {
            d->links[i] = d->links[--d->n_links];
            break;
        }
    oi_link_close(link);
}

static void drop_lease(lease_slot *slot) {
    if (slot->has_lease) oi_lease_free(&slot->lease);
    slot->has_lease = 0;
}

/* The worker at `address` is going (GOAWAY) or gone: no lease naming it is used again. */
static void forget_worker(oi_direct *d, const char *address) {
    /* `address` may be a string of a lease dropped here: the others are compared against a copy (without
     * one, out of memory, every lease goes: the next request takes new ones) */
    char *copy = strdup(address);
    for (size_t i = 0; i < d->n_slots; i++)
        if (d->slots[i].has_lease && (!copy || oi_lease_names(&d->slots[i].lease, copy))) drop_lease(&d->slots[i]);
    free(copy);
}

static void link_lost(oi_direct *d, oi_link *link) {
    forget_worker(d, link->address);
    close_link(d, link);
}

/* Links no lease names any more, or whose worker said GOAWAY, with nothing outstanding: closed. */
static void close_unused_links(oi_direct *d) {
    for (size_t i = d->n_links; i-- > 0;) {
        oi_link *link = d->links[i];
        int named = 0;
        for (size_t s = 0; s < d->n_slots && !named; s++)
            named = d->slots[s].has_lease && oi_lease_names(&d->slots[s].lease, link->address);
        if ((link->draining || !named) && link->outstanding == 0) close_link(d, link);
    }
}

/* Its size is bounded before it gets here: a worker's by the link (max_first_frame), the front door's
 * by the exchange (openinfer.c). */
static int decode_header(const oi_frame *frames, size_t n, msgpack_unpacked *header) {
    msgpack_unpacked_destroy(header);
    if (n == 0) {
        msgpack_unpacked_init(header);
        return 0;
    }
    return oi_unpack_one(header, frames[0].data, frames[0].size) && header->data.type == MSGPACK_OBJECT_MAP;
}

static int header_id(const msgpack_object *h, uint64_t *id) {
    const msgpack_object *o = oi_map_get(h, "id");
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER) return 0;
    *id = o->via.u64;
    return 1;
}

/* Messages complete in the link's buffer: GOAWAY noted, the reply to `id` returned (1), the rest (late
 * replies, answers to cancels) dropped. 0: not there yet; OI_LINK_CLOSED. */
static int take_reply(oi_direct *d, oi_link *link, uint64_t id, int want, const oi_frame **frames, size_t *n,
                      msgpack_unpacked *header) {
    for (;;) {
        int r = oi_link_next(link, frames, n);
        if (r <= 0) return r;
        if (!decode_header(*frames, *n, header)) { /* no request can be told from it: the link goes, as in the Python clients */
            snprintf(link->why, sizeof link->why, "a reply header that is not a protocol map");
            return OI_LINK_PROTOCOL;
        }
        if (oi_reply_is_goaway(&header->data)) {
            link->draining = 1;
            if (want && oi_goaway_lists(&header->data, id)) link->read_awaited = 1;
            forget_worker(d, link->address);
            continue;
        }
        uint64_t got;
        if (want && header_id(&header->data, &got) && got == id) return 1;
    }
}

/* Wait on `link` for the reply to `id`: OI_LINK_OK, OI_LINK_CLOSED, OI_LINK_OVERSIZED, OI_LINK_PROTOCOL,
 * OI_LINK_TIMEOUT or OI_LINK_ERROR. */
static int await_reply(oi_direct *d, oi_link *link, uint64_t id, int64_t deadline_ms, const oi_frame **frames, size_t *n,
                       msgpack_unpacked *header) {
    for (;;) {
        int r = take_reply(d, link, id, 1, frames, n, header);
        if (r == 1) return OI_LINK_OK;
        if (r < 0) return r == OI_LINK_OVERSIZED || r == OI_LINK_PROTOCOL ? r : OI_LINK_CLOSED;
        /* the deadline holds even while bytes keep coming (a worker that streams a message without end) */
        if (oi_now_ms() >= deadline_ms || !oi_link_wait(link, deadline_ms)) return OI_LINK_TIMEOUT;
        if ((r = oi_link_fill(link)) != OI_LINK_OK) return r;
    }
}

/* 1 when the cancel was written; the caller decides the link's fate (a failed send here once closed and
 * freed the link, which the caller then read and closed again: round 21). */
static int send_cancel(oi_direct *d, oi_link *link, uint64_t target) {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 4);
    msgpack_pack_str_with_body(&pk, "v", 1);
    msgpack_pack_uint64(&pk, 1);
    msgpack_pack_str_with_body(&pk, "id", 2);
    msgpack_pack_uint64(&pk, (*d->next_id)++);
    msgpack_pack_str_with_body(&pk, "op", 2);
    msgpack_pack_str_with_body(&pk, "cancel", 6);
    msgpack_pack_str_with_body(&pk, "target", 6);
    msgpack_pack_uint64(&pk, target);
    oi_frame frame = {sb.data, sb.size};
    int sent = sb.data && oi_link_send(link, &frame, 1, oi_now_ms() + CANCEL_WAIT_MS) == OI_LINK_OK;
    msgpack_sbuffer_destroy(&sb);
    return sent;
}

/* ---- leases ------------------------------------------------------------------------------------ */

static lease_slot *find_slot(oi_direct *d, const char *model, int64_t version, int create) {
    for (size_t i = 0; i < d->n_slots; i++)
        if (d->slots[i].version == version && strcmp(d->slots[i].model, model) == 0) return &d->slots[i];
    if (!create) return NULL;
    lease_slot *slot;
    if (d->n_slots < MAX_LEASES) {
        slot = &d->slots[d->n_slots];
    } else { /* the least recently used makes room */
        slot = &d->slots[0];
        for (size_t i = 1; i < d->n_slots; i++)
            if (d->slots[i].used_ns < slot->used_ns) slot = &d->slots[i];
        drop_lease(slot);
        free(slot->model);
        d->n_slots--;
    }
    memset(slot, 0, sizeof *slot);
    if (!(slot->model = strdup(model))) return NULL;
    slot->version = version;
    d->n_slots++;
    return slot;
}

/* A lease for the request's model version: OI_OK (*slot_out has one), OI_DIRECT_USE_FRONT_DOOR, the
 * front door's refusal kept in d->refusal as the answer (OI_OK with *refused = 1), or a local failure.
 * A renewal that fails locally (the front door did not answer) keeps a lease that has not expired. */
static int lease_for(oi_direct *d, const oi_direct_request *req, lease_slot **slot_out, int *refused, oi_error *err) {
    int64_t now = oi_now_ns();
    lease_slot *slot = find_slot(d, req->model, req->version, 0);
    if (slot && slot->has_lease && now < slot->lease.renew_ns) {
        slot->used_ns = now;
        *slot_out = slot;
        return OI_OK;
    }
    if (slot && now < slot->not_before_ns) return OI_DIRECT_USE_FRONT_DOOR;
    if (!(slot = find_slot(d, req->model, req->version, 1)))
        return fail(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", "out of memory");
    slot->used_ns = now;

    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    uint64_t id = (*d->next_id)++;
    oi_pack_lease_request(&pk, id, req->model, req->version);
    oi_frame frame = {sb.data, sb.size};
    oi_reply_free(&d->refusal);
    if (!sb.data) return fail(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", "out of memory");
    int rc = d->call(d->client, &frame, id, req->wait_deadline_ms, &d->refusal);
    msgpack_sbuffer_destroy(&sb);
    if (rc != OI_OK) {
        if (slot->has_lease && oi_now_ns() < slot->lease.expires_ns) {
            *slot_out = slot;
            return OI_OK;
        }
        *err = d->refusal.error;
        return rc;
    }
    drop_lease(slot);
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    if (!decode_header(d->refusal.frames, d->refusal.n_frames, &u)) {
        rc = OI_DIRECT_USE_FRONT_DOOR; /* not a reply of this protocol: let the front door path say so */
    } else if (oi_map_get(&u.data, "error")) {
        switch (oi_lease_refusal(oi_map_get(&u.data, "error"))) {
        case OI_LEASE_REFUSED_EVER: d->off = 1; rc = OI_DIRECT_USE_FRONT_DOOR; break;
        case OI_LEASE_REFUSED_NOW: slot->not_before_ns = now + NOT_NOW_NS; rc = OI_DIRECT_USE_FRONT_DOOR; break;
        default: *refused = 1; rc = OI_OK; break; /* NOT_FOUND, PERMISSION_DENIED ...: the caller's answer */
        }
    } else {
        int parsed = oi_lease_parse(oi_map_get(&u.data, "result"), now, &slot->lease);
        if (parsed == 0) {
            slot->has_lease = 1;
            slot->lease.serial = ++d->serial;
            *slot_out = slot;
            close_unused_links(d);
        } else if (parsed == -2) {
            rc = fail(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", "out of memory");
        } else {
            slot->not_before_ns = now + NOT_NOW_NS; /* not a lease we understand: the front door serves */
            rc = OI_DIRECT_USE_FRONT_DOOR;
        }
    }
    msgpack_unpacked_destroy(&u);
    return rc;
}

/* Send `attach` of the slot's lease on `link` (or connect with it) and wait for its answer.
 * OI_OK (attached), RETRY (expired, or the worker is gone: a new lease), OI_ERR_TIMEOUT, or 1 when its
 * refusal is the request's answer (in *frames / header). */
static int attach(oi_direct *d, lease_slot *slot, const char *lease_address, oi_link **link_io, int64_t deadline_ms,
                  const oi_frame **frames, size_t *n, msgpack_unpacked *header, oi_error *err) {
    /* A copy: `lease_address` belongs to the slot's lease, which a GOAWAY read while waiting for the
     * answer drops and frees (round 21: the timeout's message was then written from freed memory). */
    char address[256];
    snprintf(address, sizeof address, "%s", lease_address);
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    uint64_t id = (*d->next_id)++;
    oi_pack_attach(&pk, id, &slot->lease);
    if (!sb.data) return fail(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", "out of memory");
    oi_frame frame = {sb.data, sb.size};
    oi_link *link = *link_io;
    int rc;
    if (!link) {
        if (d->n_links == MAX_LINKS) close_unused_links(d);
        if (d->n_links == MAX_LINKS) close_link(d, d->links[0]);
        link = oi_link_connect(address, &frame, 1, deadline_ms, &rc);
        if (link) d->links[d->n_links++] = link;
    } else {
        rc = oi_link_send(link, &frame, 1, deadline_ms);
    }
    msgpack_sbuffer_destroy(&sb);
    if (!link) { /* ENOENT, ECONNREFUSED: the worker is gone since the lease was issued */
        /* the error is written before forget_worker, which frees `address` with the lease it belongs to */
        int answer = rc == OI_LINK_TIMEOUT ? fail(err, OI_ERR_TIMEOUT, "DEADLINE_EXCEEDED", "no connection to the worker at %s in time", address) : RETRY;
        forget_worker(d, address);
        d->turn++; /* the next attempt starts at another worker: the daemon may not have seen this one go yet */
        return answer;
    }
    if (rc == OI_LINK_OK) rc = await_reply(d, link, id, deadline_ms, frames, n, header);
    if (rc == OI_LINK_TIMEOUT) {
        close_link(d, link);
        *link_io = NULL;
        return fail(err, OI_ERR_TIMEOUT, "DEADLINE_EXCEEDED", "no answer to attach from the worker at %s in time", address);
    }
    if (rc != OI_LINK_OK) {
        link_lost(d, link);
        *link_io = NULL;
        return RETRY;
    }
    *link_io = link;
    if (!slot->has_lease) return RETRY; /* a GOAWAY came before the answer: the lease is gone, the worker retiring */
    if (!oi_map_get(&header->data, "error")) {
        link->attached = slot->lease.serial;
        link->max_message = slot->lease.max_reply_bytes < d->max_reply_bytes ? slot->lease.max_reply_bytes : d->max_reply_bytes;
        return OI_OK;
    }
    if (oi_reply_lease_expired(&header->data)) {
        drop_lease(slot);
        return RETRY;
    }
    return 1;
}

/* A worker connection with the slot's lease attached: OI_OK, RETRY, 1 (a refusal is the answer), or a
 * local failure. */
static int link_for(oi_direct *d, lease_slot *slot, int64_t deadline_ms, oi_link **out, const oi_frame **frames, size_t *n,
                    msgpack_unpacked *header, oi_error *err) {
    const oi_lease *lease = &slot->lease;
    const char *address = NULL;
    oi_link *link = NULL;
    for (size_t k = 0; k < lease->n_addresses && !address; k++) {
        const char *candidate = lease->addresses[(d->turn + k) % lease->n_addresses];
        link = find_link(d, candidate);
        if (link) { /* what it sent since we last looked: GOAWAY, late replies, or that it closed */
            if (oi_link_fill(link) != OI_LINK_OK || take_reply(d, link, 0, 0, frames, n, header) < 0) {
                link_lost(d, link);
                return RETRY;
            }
            if (link->draining) continue;
        }
        address = candidate;
        d->turn = (d->turn + k) % lease->n_addresses;
    }
    if (!slot->has_lease) return RETRY; /* a GOAWAY just read made it go */
    if (!address) {
        drop_lease(slot); /* every worker it names is retiring: the next lease names their successors */
        return RETRY;
    }
    if (!link || link->attached != lease->serial) {
        int rc = attach(d, slot, address, &link, deadline_ms, frames, n, header, err);
        if (rc != OI_OK) return rc;
    }
    *out = link;
    return OI_OK;
}

/* ---- one request ------------------------------------------------------------------------------- */

/* RESOURCE_EXHAUSTED naming the bound a worker's reply broke (nothing was made room for it). */
static void oversized(const oi_link *link, const char *address, oi_error *err) {
    unsigned long long size = (unsigned long long)link->over_size;
    if (link->over == OI_LINK_OVER_FIRST_FRAME)
        fail(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED",
             "the reply header from the worker at %s is %llu bytes, over this client's limit of %llu bytes for a reply header (OI_MAX_REPLY_HEADER_BYTES)",
             address, size, (unsigned long long)(link->max_first_frame ? link->max_first_frame : OI_MAX_REPLY_HEADER_BYTES));
    else if (link->over == OI_LINK_OVER_FRAMES)
        fail(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED",
             "the reply from the worker at %s has more than this client's limit of %d frames", address, OI_LINK_MAX_FRAMES);
    else
        fail(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED",
             "the reply from the worker at %s is over this client's limit of %llu bytes (the lease's max_reply_bytes, the daemon's server.max_worker_message_bytes, or the client's own max_reply_bytes if smaller)",
             address, (unsigned long long)link->max_message);
}

int oi_direct_infer(oi_direct *d, const oi_direct_request *req, oi_direct_answer *answer, msgpack_unpacked *header,
                    oi_error *err) {
    memset(answer, 0, sizeof *answer);
    oi_reply_free(&d->refusal);
    close_unused_links(d); /* those that said GOAWAY during the last request, now answered */
    int resent = 0, closes_after_goaway = 0;
    for (int attempt = 0; attempt < ATTEMPTS && !d->off; attempt++) {
        lease_slot *slot = NULL;
        int refused = 0;
        int rc = lease_for(d, req, &slot, &refused, err);
        if (rc != OI_OK) return rc;
        if (refused) {
            answer->frames = d->refusal.frames;
            answer->n_frames = d->refusal.n_frames;
            decode_header(answer->frames, answer->n_frames, header);
            return OI_OK;
        }
        char why[sizeof err->message];
        if (oi_lease_check_size(&slot->lease, req->frames[0].size, req->n_frames, req->tensor_bytes, why, sizeof why) != 0)
            return fail(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", "%s", why);
        oi_link *link = NULL;
        const oi_frame *frames;
        size_t n;
        rc = link_for(d, slot, req->wait_deadline_ms, &link, &frames, &n, header, err);
        if (rc == RETRY) continue;
        if (rc == 1) { /* attach refused for a reason a new lease would not cure */
            answer->frames = frames;
            answer->n_frames = n;
            answer->from_worker = 1;
            return OI_OK;
        }
        if (rc != OI_OK) return rc;

        answer->sent_us = oi_now_ns() / 1000;
        answer->from_worker = 1;
        /* taken now: a GOAWAY read while waiting drops the lease */
        int64_t overrun_after_us = slot->lease.max_compute_ms ? answer->sent_us + (int64_t)slot->lease.max_compute_ms * 1000 : INT64_MAX;
        rc = oi_link_send(link, req->frames, req->n_frames, req->wait_deadline_ms);
        if (rc == OI_LINK_CLOSED) { /* gone before it could read the request: it never ran */
            answer->from_worker = 0;
            link_lost(d, link);
            continue;
        }
        if (rc != OI_LINK_OK) {
            int saved = errno;
            close_link(d, link); /* maybe half a message on it */
            return rc == OI_LINK_TIMEOUT ? fail(err, OI_ERR_TIMEOUT, "DEADLINE_EXCEEDED", "could not send to the worker in time")
                                         : fail(err, OI_ERR_TRANSPORT, "UNAVAILABLE", "cannot send to the worker: %s", strerror(saved));
        }
        link->outstanding++;
        link->read_awaited = 0;
        rc = await_reply(d, link, req->id, req->wait_deadline_ms, &frames, &n, header);
        link->outstanding--;
        if (rc == OI_LINK_TIMEOUT) {
            /* Its worker may still be running the request, past its deadline, to be killed for it: the
             * next request must not go there. Closing the link and the leases naming it makes the next
             * one take a new lease, which leaves out a worker running past a deadline. A cancel that
             * cannot be written (a worker not reading) ends the link too: maybe half of it is on it. */
            if (!send_cancel(d, link, req->id) || link->outstanding == 0) link_lost(d, link);
            return fail(err, OI_ERR_TIMEOUT, "DEADLINE_EXCEEDED", "no reply from the worker within the client's timeout (%d ms, plus %d ms of grace)",
                        req->timeout_ms, OI_DIRECT_REPLY_GRACE_MS);
        }
        if (rc == OI_LINK_OVERSIZED || rc == OI_LINK_PROTOCOL) { /* what a worker of ours never sends: the link goes */
            char address[256];
            snprintf(address, sizeof address, "%s", link->address);
            if (rc == OI_LINK_OVERSIZED) oversized(link, address, err);
            else fail(err, OI_ERR_PROTOCOL, "INTERNAL", "the worker at %s broke the protocol: %s; its connection is closed", address, link->why);
            link_lost(d, link);
            return rc == OI_LINK_OVERSIZED ? OI_ERR_RESOURCE_EXHAUSTED : OI_ERR_PROTOCOL;
        }
        if (rc != OI_LINK_OK) {
            char address[256];
            snprintf(address, sizeof address, "%s", link->address);
            int retired = link->draining, read_awaited = link->read_awaited;
            link_lost(d, link);
            int64_t now_us = oi_now_ns() / 1000;
            if (now_us >= answer->sent_us + (int64_t)req->timeout_ms * 1000)
                return fail(err, OI_ERR_DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED",
                            "the request's deadline (%d ms) passed while it ran, and its worker (%s) was killed", req->timeout_ms, address);
            if (now_us >= overrun_after_us)
                return fail(err, OI_ERR_DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED",
                            "it was still running past the model's max_compute_ms (%llu ms), and its worker (%s) was killed and is being replaced",
                            (unsigned long long)(overrun_after_us - answer->sent_us) / 1000, address);
            if (retired && !read_awaited) { /* its GOAWAY did not list it: never read (it answers all it read before it closes; 17.5) */
                answer->from_worker = 0;
                if (++closes_after_goaway > 1) return OI_DIRECT_USE_FRONT_DOOR; /* a second such worker: the front door takes it */
                continue;
            }
            if (retired)
                return fail(err, OI_ERR_WORKER_CRASHED, "WORKER_CRASHED",
                            "the worker at %s had read this request when it retired, and exited without answering it (it may have crashed running it: it is not sent again)", address);
            return fail(err, OI_ERR_WORKER_CRASHED, "WORKER_CRASHED",
                        "the worker at %s closed its connection while running this request (it exited)", address);
        }
        if (oi_reply_lease_expired(&header->data)) { /* the worker did not run it */
            answer->from_worker = 0;
            drop_lease(slot);
            /* expired again (reloads back to back): the front door takes it, as the Python clients do; the
             * refusal itself was the answer before (round 23) */
            if (resent) return OI_DIRECT_USE_FRONT_DOOR;
            resent = 1; /* a new lease, attached, and the same request again */
            continue;
        }
        answer->frames = frames;
        answer->n_frames = n;
        const msgpack_object *queue_us = oi_map_get(oi_map_get(&header->data, "timing"), "queue_us");
        if (queue_us && queue_us->type == MSGPACK_OBJECT_FLOAT64 && queue_us->via.f64 > MOVE_ON_QUEUE_US) d->turn++;
        return OI_OK;
    }
    return OI_DIRECT_USE_FRONT_DOOR;
}

void oi_direct_free(oi_direct *d) {
    if (!d) return;
    while (d->n_links) close_link(d, d->links[d->n_links - 1]);
    for (size_t i = 0; i < d->n_slots; i++) {
        drop_lease(&d->slots[i]);
        free(d->slots[i].model);
    }
    oi_reply_free(&d->refusal);
    free(d);
}
