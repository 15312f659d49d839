/* cwire: a closed-loop load generator speaking the OpenInfer wire protocol (docs/PROTOCOL.md) in C.
 *
 * Why C: the Python generators cost 20-200 us of CPU per request on the same 2 cores as the daemon,
 * so they measure themselves as much as the daemon. This one costs ~5 us.
 *
 * Two paths to the daemon (chosen per address at `prepare`):
 *   front door  one DEALER socket to the daemon's socket (PROTOCOL.md 2), every request through the
 *               supervisor;
 *   direct      (PROTOCOL.md 17) a lease from the front door, then one ZMTP connection per worker of the
 *               model (client/c/zmtp_link.c: no libzmq thread), requests sent straight to the workers,
 *               each to the worker with the fewest outstanding (ties: the one used last). The lease is
 *               renewed before it expires and attached again on every connection; a request answered
 *               PERMISSION_DENIED with details.lease "expired" is sent again under a new lease (not
 *               counted: the worker did not run it); a worker that says GOAWAY gets nothing more, and a
 *               new lease names its successors; a connection that closes fails what was outstanding on it
 *               (counted as WORKER_CRASHED) and the loop goes on under a new lease.
 *   The default is direct when the address is ipc:// and the daemon grants a lease, else the front door;
 *   --front-door forces the front door, --direct makes `prepare` fail without a lease.
 *
 * Driven over stdin/stdout by bench/cwireload.py, one command per line:
 *   prepare ADDRESS                                   connect (once per address), 50 warm-up requests
 *   run ADDRESS INFLIGHT START_NS MEASURE_NS END_NS FILE
 *       INFLIGHT requests outstanding, each reply starts the next, from START_NS (CLOCK_MONOTONIC, the
 *       clock of Python's time.monotonic_ns) until END_NS; requests sent at or after MEASURE_NS and
 *       answered by END_NS are recorded into FILE (binary, see write_results)
 *   quit
 * Each command is answered by one line: "ok PATH" (prepare; PATH is "direct" or "front-door"), "ok"
 * (run), or "error <text>".
 * The request: {"v":1,"op":"infer","model":MODEL,"inputs":[{"name":INPUT,"datatype":"FP32",
 * "shape":[ROWS,COLS]}],"id":N} + one frame of ROWS*COLS float32 ones; its header is packed once and
 * only the id changes. --distinct: the first two values are the id (low 24 bits, the rest), so no two
 * requests ask the same question (a verdict cache never answers them: bench/cache.py).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <msgpack.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "lease.h"
#include "zmtp_link.h"

#define MAX_TARGETS 8
#define MAX_LINKS 16
#define MAX_STAGES 24
#define MAX_CODES 16
#define MAX_INFLIGHT 4096
#define LEASE_WAIT_MS 10000
#define WARMUP 50

enum { PATH_AUTO, PATH_FRONT_DOOR, PATH_DIRECT };
static const char *PATH_NAMES[] = {"auto", "front-door", "direct"};

typedef struct {
    char name[32];
    double *values;
    size_t count, capacity;
} series;

/* One daemon address: its front door socket and, on the direct path, its lease and worker links. */
typedef struct {
    char address[512];
    void *socket;
    int path;
    int has_lease;
    oi_lease lease;
    uint64_t serial;
    oi_link *links[MAX_LINKS];
    size_t n_links;
    oi_link *last; /* the link used last (c=1 stays on one worker) */
    /* what happened on the direct path during a run (reported in the results file) */
    uint64_t leases, resent, goaways, links_lost;
} target;

static const char *model, *input;
static long rows, cols;
static void *context;
static target targets[MAX_TARGETS];
static size_t n_targets;
static float *payload;
static size_t payload_bytes;
static uint64_t next_id = 1;
static int wanted_path = PATH_AUTO;
static unsigned char header[1024]; /* the request header, packed once; the id is its last 8 bytes */
static size_t header_size;

static int64_t now_ns(void) { return oi_now_ns(); }

static void *grow(void *data, size_t *capacity, size_t item) {
    *capacity = *capacity ? *capacity * 2 : 4096;
    void *bigger = realloc(data, *capacity * item);
    if (!bigger) {
        fprintf(stderr, "cwire: out of memory\n");
        exit(1);
    }
    return bigger;
}

static void pack_str(msgpack_packer *p, const char *s) {
    size_t n = strlen(s);
    msgpack_pack_str(p, n);
    msgpack_pack_str_body(p, s, n);
}

/* The header with "id" last as a uint 64 (cf + 8 big-endian bytes), so each request only patches it. */
static int pack_header(void) {
    msgpack_sbuffer buffer;
    msgpack_packer p;
    msgpack_sbuffer_init(&buffer);
    msgpack_packer_init(&p, &buffer, msgpack_sbuffer_write);
    msgpack_pack_map(&p, 5);
    pack_str(&p, "v");
    msgpack_pack_int(&p, 1);
    pack_str(&p, "op");
    pack_str(&p, "infer");
    pack_str(&p, "model");
    pack_str(&p, model);
    pack_str(&p, "inputs");
    msgpack_pack_array(&p, 1);
    msgpack_pack_map(&p, 3);
    pack_str(&p, "name");
    pack_str(&p, input);
    pack_str(&p, "datatype");
    pack_str(&p, "FP32");
    pack_str(&p, "shape");
    msgpack_pack_array(&p, 2);
    msgpack_pack_int64(&p, rows);
    msgpack_pack_int64(&p, cols);
    pack_str(&p, "id");
    int ok = buffer.size + 9 <= sizeof header;
    if (ok) {
        memcpy(header, buffer.data, buffer.size);
        header[buffer.size] = 0xcf;
        header_size = buffer.size + 9;
    }
    msgpack_sbuffer_destroy(&buffer);
    return ok;
}

static int distinct; /* --distinct: every request's input differs (its id in the first two values) */

static uint64_t stamp_id(void) {
    uint64_t id = next_id++;
    for (int i = 0; i < 8; i++) header[header_size - 8 + i] = (unsigned char)(id >> (56 - 8 * i));
    if (distinct && payload_bytes >= 2 * sizeof(float)) { /* both paths copy the payload before the next stamp */
        payload[0] = (float)(id % 16777216u);
        payload[1] = (float)(id / 16777216u);
    }
    return id;
}

/* ---- replies ------------------------------------------------------------------------------------ */

typedef struct {
    uint64_t id;
    int has_id;
    int has_error;
    int lease_expired; /* PERMISSION_DENIED with details.lease "expired" */
    int goaway;
    char code[32];
    size_t n_timing;
    char timing_keys[MAX_STAGES][32];
    double timing_values[MAX_STAGES];
} reply;

static int key_is(const msgpack_object *key, const char *name) {
    return key->type == MSGPACK_OBJECT_STR && key->via.str.size == strlen(name) && memcmp(key->via.str.ptr, name, key->via.str.size) == 0;
}

static double number(const msgpack_object *o) {
    switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: return o->via.f64;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: return (double)o->via.u64;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: return (double)o->via.i64;
    default: return 0.0;
    }
}

/* Parse a reply header (id, error code, timing). 0 on success, -1 if it is not a msgpack map. */
static int parse_reply(const void *data, size_t size, reply *out) {
    memset(out, 0, sizeof *out);
    msgpack_unpacked unpacked;
    msgpack_unpacked_init(&unpacked);
    int rc = -1;
    if (msgpack_unpack_next(&unpacked, data, size, NULL) == MSGPACK_UNPACK_SUCCESS && unpacked.data.type == MSGPACK_OBJECT_MAP) {
        rc = 0;
        const msgpack_object_map *map = &unpacked.data.via.map;
        for (uint32_t i = 0; i < map->size; i++) {
            const msgpack_object *key = &map->ptr[i].key, *value = &map->ptr[i].val;
            if (key_is(key, "id") && value->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
                out->id = value->via.u64;
                out->has_id = 1;
            } else if (key_is(key, "error") && value->type == MSGPACK_OBJECT_MAP) {
                out->has_error = 1;
                snprintf(out->code, sizeof out->code, "UNKNOWN");
                const msgpack_object *code = oi_map_get(value, "code");
                if (code && code->type == MSGPACK_OBJECT_STR) snprintf(out->code, sizeof out->code, "%.*s", (int)code->via.str.size, code->via.str.ptr);
            } else if (key_is(key, "timing") && value->type == MSGPACK_OBJECT_MAP) {
                for (uint32_t j = 0; j < value->via.map.size && out->n_timing < MAX_STAGES; j++) {
                    const msgpack_object *k = &value->via.map.ptr[j].key;
                    if (k->type != MSGPACK_OBJECT_STR || k->via.str.size >= 32) continue;
                    snprintf(out->timing_keys[out->n_timing], 32, "%.*s", (int)k->via.str.size, k->via.str.ptr);
                    out->timing_values[out->n_timing++] = number(&value->via.map.ptr[j].val);
                }
            }
        }
        out->lease_expired = out->has_error && oi_reply_lease_expired(&unpacked.data);
        out->goaway = oi_reply_is_goaway(&unpacked.data);
    }
    msgpack_unpacked_destroy(&unpacked);
    return rc;
}

/* ---- the front door ------------------------------------------------------------------------------- */

static int send_front_door(void *socket) {
    return zmq_send(socket, header, header_size, ZMQ_SNDMORE) >= 0 && zmq_send(socket, payload, payload_bytes, 0) >= 0 ? 0 : -1;
}

/* Receives one whole message from the front door: its header parsed, the other frames dropped. 0 on
 * success. `raw`, when given, keeps a copy of the header frame. */
static int receive_front_door(void *socket, reply *out, msgpack_sbuffer *raw) {
    zmq_msg_t frame;
    zmq_msg_init(&frame);
    if (zmq_msg_recv(&frame, socket, 0) < 0) {
        zmq_msg_close(&frame);
        return -1;
    }
    int rc = parse_reply(zmq_msg_data(&frame), zmq_msg_size(&frame), out);
    if (raw) msgpack_sbuffer_write(raw, zmq_msg_data(&frame), zmq_msg_size(&frame));
    int more = zmq_msg_more(&frame);
    zmq_msg_close(&frame);
    while (more) { /* the output tensors: not looked at */
        zmq_msg_init(&frame);
        if (zmq_msg_recv(&frame, socket, 0) < 0) {
            zmq_msg_close(&frame);
            return -1;
        }
        more = zmq_msg_more(&frame);
        zmq_msg_close(&frame);
    }
    return rc;
}

/* ---- the direct path ------------------------------------------------------------------------------ */

static void close_link(target *t, oi_link *link) {
    for (size_t i = 0; i < t->n_links; i++)
        if (t->links[i] == link) {
            t->links[i] = t->links[--t->n_links];
            break;
        }
    if (t->last == link) t->last = NULL;
    oi_link_close(link);
}

static void drop_lease(target *t) {
    if (t->has_lease) oi_lease_free(&t->lease);
    t->has_lease = 0;
}

/* Ask the front door for a lease (blocking). 0, or -1 with `why`; *refusal is the lease's error code
 * kind (oi_lease_refusal) when the daemon refused. */
static int take_lease(target *t, char *why, size_t why_size, int *refusal) {
    drop_lease(t);
    *refusal = -1;
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    uint64_t id = next_id++;
    oi_pack_lease_request(&pk, id, model, -1);
    int64_t asked = now_ns();
    int sent = zmq_send(t->socket, sb.data, sb.size, 0) >= 0;
    msgpack_sbuffer_destroy(&sb);
    if (!sent) return snprintf(why, why_size, "cannot send lease: %s", zmq_strerror(errno)), -1;
    for (;;) {
        zmq_pollitem_t item = {t->socket, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, LEASE_WAIT_MS) <= 0) return snprintf(why, why_size, "no answer to lease"), -1;
        reply answer;
        msgpack_sbuffer raw;
        msgpack_sbuffer_init(&raw);
        int rc = receive_front_door(t->socket, &answer, &raw);
        if (rc != 0 || !answer.has_id || answer.id != id) { /* a warm-up leftover */
            msgpack_sbuffer_destroy(&raw);
            continue;
        }
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        msgpack_unpack_next(&u, raw.data, raw.size, NULL);
        if (answer.has_error) {
            *refusal = oi_lease_refusal(oi_map_get(&u.data, "error"));
            snprintf(why, why_size, "lease refused: %s", answer.code);
            rc = -1;
        } else if (oi_lease_parse(oi_map_get(&u.data, "result"), asked, &t->lease) != 0) {
            snprintf(why, why_size, "not a lease");
            rc = -1;
        } else {
            t->has_lease = 1;
            t->lease.serial = ++t->serial;
            t->leases++;
        }
        msgpack_unpacked_destroy(&u);
        msgpack_sbuffer_destroy(&raw);
        return rc;
    }
}

static int send_attach(target *t, oi_link *link) {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    oi_pack_attach(&pk, next_id++, &t->lease);
    oi_frame frame = {sb.data, sb.size};
    int rc = oi_link_send(link, &frame, 1, oi_now_ms() + LEASE_WAIT_MS);
    msgpack_sbuffer_destroy(&sb);
    if (rc == OI_LINK_OK) link->attached = t->lease.serial;
    return rc;
}

/* Links to every worker of a fresh lease, each with it attached (attach goes ahead of the requests on
 * the same connection: the worker reads them in order). Links no lease names, or retiring with nothing
 * outstanding, are closed. 0, or -1 with `why`. */
static int renew(target *t, char *why, size_t why_size) {
    int refusal;
    if (take_lease(t, why, why_size, &refusal) != 0) return -1;
    for (size_t i = t->n_links; i-- > 0;)
        if ((t->links[i]->draining || !oi_lease_names(&t->lease, t->links[i]->address)) && t->links[i]->outstanding == 0)
            close_link(t, t->links[i]);
    for (size_t a = 0; a < t->lease.n_addresses; a++) {
        const char *address = t->lease.addresses[a];
        oi_link *link = NULL;
        for (size_t i = 0; i < t->n_links && !link; i++)
            if (strcmp(t->links[i]->address, address) == 0) link = t->links[i];
        if (link && link->draining) continue;
        if (!link) {
            if (t->n_links == MAX_LINKS) continue;
            int status;
            if (!(link = oi_link_connect(address, NULL, 0, oi_now_ms() + LEASE_WAIT_MS, &status))) continue; /* gone meanwhile */
            t->links[t->n_links++] = link;
        }
        if (send_attach(t, link) != OI_LINK_OK) close_link(t, link);
    }
    for (size_t i = 0; i < t->n_links; i++)
        if (!t->links[i]->draining) return 0;
    snprintf(why, why_size, "no worker of the lease could be reached");
    return -1;
}

/* The link for the next request: the usable one with the fewest outstanding (ties: the last used). */
static oi_link *pick_link(target *t, char *why, size_t why_size) {
    if (!t->has_lease || now_ns() >= t->lease.renew_ns) {
        if (renew(t, why, why_size) != 0) return NULL;
    }
    oi_link *best = NULL;
    for (size_t i = 0; i < t->n_links; i++) {
        oi_link *link = t->links[i];
        if (link->draining || link->attached != t->lease.serial) continue;
        if (!best || link->outstanding < best->outstanding || (link->outstanding == best->outstanding && link == t->last)) best = link;
    }
    if (!best) { /* every link retiring or gone: a new lease */
        drop_lease(t);
        return pick_link(t, why, why_size);
    }
    return best;
}

static int send_direct(target *t, oi_link **used, char *why, size_t why_size) {
    for (int attempt = 0; attempt < 3; attempt++) {
        oi_link *link = pick_link(t, why, why_size);
        if (!link) return -1;
        oi_frame frames[2] = {{header, header_size}, {payload, payload_bytes}};
        int rc = oi_link_send(link, frames, 2, oi_now_ms() + LEASE_WAIT_MS);
        if (rc == OI_LINK_OK) {
            link->outstanding++;
            t->last = *used = link;
            return 0;
        }
        if (link->outstanding == 0) { /* gone before it read anything of ours: try the others */
            t->links_lost++;
            close_link(t, link);
            drop_lease(t);
            continue;
        }
        link->draining = 1; /* its outstanding requests are failed when its close is read */
        drop_lease(t);
    }
    snprintf(why, why_size, "cannot send to any worker");
    return -1;
}

/* ---- results -------------------------------------------------------------------------------------- */

typedef struct {
    int64_t *latencies;
    size_t n_latencies, cap_latencies;
    series stages[MAX_STAGES];
    size_t n_stages;
    char codes[MAX_CODES][32];
    uint64_t code_counts[MAX_CODES];
    size_t n_codes;
} results;

static void record_stage(results *r, const char *name, double value) {
    size_t i = 0;
    while (i < r->n_stages && strcmp(r->stages[i].name, name) != 0) i++;
    if (i == r->n_stages) {
        if (r->n_stages == MAX_STAGES) return;
        snprintf(r->stages[i].name, sizeof r->stages[i].name, "%s", name);
        r->n_stages++;
    }
    series *s = &r->stages[i];
    if (s->count == s->capacity) s->values = grow(s->values, &s->capacity, sizeof(double));
    s->values[s->count++] = value;
}

static void record_error(results *r, const char *code) {
    size_t i = 0;
    while (i < r->n_codes && strcmp(r->codes[i], code) != 0) i++;
    if (i == r->n_codes) {
        if (r->n_codes == MAX_CODES) return;
        snprintf(r->codes[i], sizeof r->codes[i], "%s", code);
        r->n_codes++;
    }
    r->code_counts[i]++;
}

static void write_text(FILE *f, const char *text) {
    uint32_t len = (uint32_t)strlen(text);
    fwrite(&len, sizeof len, 1, f);
    fwrite(text, 1, len, f);
}

/* FILE layout (little-endian, native): u64 n_latencies, i64 latencies[n]; u32 n_stages, then per stage
 * u32 name_len, name bytes, u64 n, f64 values[n]; u32 n_codes, then per code u32 len, bytes, u64 count;
 * then the path (u32 len, bytes: "direct" or "front-door") and u32 n_counters, per counter u32 len, name,
 * u64 value (leases, resent, goaways, links_lost: what the direct path did during the run). */
static int write_results(const results *r, const target *t, const char *path) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    uint64_t n = r->n_latencies;
    fwrite(&n, sizeof n, 1, f);
    fwrite(r->latencies, sizeof(int64_t), r->n_latencies, f);
    uint32_t count = (uint32_t)r->n_stages;
    fwrite(&count, sizeof count, 1, f);
    for (size_t i = 0; i < r->n_stages; i++) {
        write_text(f, r->stages[i].name);
        n = r->stages[i].count;
        fwrite(&n, sizeof n, 1, f);
        fwrite(r->stages[i].values, sizeof(double), r->stages[i].count, f);
    }
    count = (uint32_t)r->n_codes;
    fwrite(&count, sizeof count, 1, f);
    for (size_t i = 0; i < r->n_codes; i++) {
        write_text(f, r->codes[i]);
        fwrite(&r->code_counts[i], sizeof(uint64_t), 1, f);
    }
    write_text(f, PATH_NAMES[t->path]);
    const char *names[] = {"leases", "resent", "goaways", "links_lost"};
    const uint64_t values[] = {t->leases, t->resent, t->goaways, t->links_lost};
    count = 4;
    fwrite(&count, sizeof count, 1, f);
    for (size_t i = 0; i < count; i++) {
        write_text(f, names[i]);
        fwrite(&values[i], sizeof(uint64_t), 1, f);
    }
    return fclose(f);
}

static void free_results(results *r) {
    free(r->latencies);
    for (size_t i = 0; i < r->n_stages; i++) free(r->stages[i].values);
}

/* ---- the closed loop -------------------------------------------------------------------------------- */

typedef struct {
    uint64_t id;
    int64_t sent_ns;
    oi_link *link; /* direct path: where it was sent */
} outstanding;

static outstanding slots[MAX_INFLIGHT];
static long n_slots;

static long slot_of(uint64_t id) {
    for (long i = 0; i < n_slots; i++)
        if (slots[i].id == id) return i;
    return -1;
}

static void record(results *r, const reply *answer, int64_t t0, int64_t t1, int64_t measure_ns, int64_t end_ns) {
    if (t0 < measure_ns || t1 > end_ns) return;
    if (answer->has_error) {
        record_error(r, answer->code);
        return;
    }
    if (r->n_latencies == r->cap_latencies) r->latencies = grow(r->latencies, &r->cap_latencies, sizeof(int64_t));
    r->latencies[r->n_latencies++] = t1 - t0;
    for (size_t i = 0; i < answer->n_timing; i++) record_stage(r, answer->timing_keys[i], answer->timing_values[i]);
}

/* Send the request of slot `i` (a new id), on the target's path. 0, or -1 with `why`. */
static int send_slot(target *t, long i, char *why, size_t why_size) {
    slots[i].id = stamp_id();
    slots[i].sent_ns = now_ns();
    if (t->path == PATH_FRONT_DOOR) {
        slots[i].link = NULL;
        if (send_front_door(t->socket) == 0) return 0;
        snprintf(why, why_size, "send failed (%s)", zmq_strerror(errno));
        return -1;
    }
    return send_direct(t, &slots[i].link, why, why_size);
}

/* A reply for slot `i` arrived at t1: record it; send the slot's next request, or retire the slot. */
static int answered(target *t, long i, const reply *answer, int64_t t1, results *r, int64_t measure_ns, int64_t end_ns,
                    long *open, char *why, size_t why_size) {
    record(r, answer, slots[i].sent_ns, t1, measure_ns, end_ns);
    if (t1 < end_ns) return send_slot(t, i, why, why_size);
    slots[i].id = 0;
    slots[i].link = NULL;
    (*open)--;
    return 0;
}

static const char *loop_front_door(target *t, results *r, int64_t measure_ns, int64_t end_ns, long *open, char *why, size_t why_size) {
    reply answer;
    while (*open > 0) {
        if (receive_front_door(t->socket, &answer, NULL) != 0) return "receive failed or reply header not a msgpack map";
        int64_t t1 = now_ns();
        if (!answer.has_id) continue; /* a reply without an id is not to a request of ours */
        long i = slot_of(answer.id);
        if (i < 0) continue; /* not ours (a warm-up leftover) */
        if (answered(t, i, &answer, t1, r, measure_ns, end_ns, open, why, why_size) != 0) return why;
    }
    return NULL;
}

/* Everything outstanding on `link` failed with it (WORKER_CRASHED); the loop goes on elsewhere. */
static int link_closed(target *t, oi_link *link, results *r, int64_t measure_ns, int64_t end_ns, long *open, char *why, size_t why_size) {
    t->links_lost++;
    int64_t t1 = now_ns();
    reply crashed;
    memset(&crashed, 0, sizeof crashed);
    crashed.has_error = 1;
    snprintf(crashed.code, sizeof crashed.code, "WORKER_CRASHED");
    if (t->has_lease && oi_lease_names(&t->lease, link->address)) drop_lease(t);
    long lost[MAX_INFLIGHT];
    long n_lost = 0;
    for (long i = 0; i < n_slots; i++)
        if (slots[i].id && slots[i].link == link) {
            slots[i].link = NULL;
            lost[n_lost++] = i;
        }
    close_link(t, link);
    for (long k = 0; k < n_lost; k++)
        if (answered(t, lost[k], &crashed, t1, r, measure_ns, end_ns, open, why, why_size) != 0) return -1;
    return 0;
}

static int on_link_message(target *t, oi_link *link, const oi_frame *frames, size_t n, results *r, int64_t measure_ns,
                           int64_t end_ns, long *open, char *why, size_t why_size) {
    reply answer;
    int64_t t1 = now_ns();
    if (n == 0 || parse_reply(frames[0].data, frames[0].size, &answer) != 0) return 0; /* nothing waits for it */
    if (answer.goaway) {
        link->draining = 1;
        t->goaways++;
        drop_lease(t); /* the next request takes a new lease, naming the successors */
        return 0;
    }
    if (!answer.has_id) return 0;
    long i = slot_of(answer.id);
    if (i < 0 || slots[i].link != link) { /* an attach's answer: only a refusal matters */
        if (answer.lease_expired && t->has_lease && link->attached == t->lease.serial) drop_lease(t);
        return 0;
    }
    link->outstanding--;
    slots[i].link = NULL;
    if (answer.lease_expired) { /* not run: a new lease, and the same request again (not counted) */
        t->resent++;
        if (t->has_lease && link->attached == t->lease.serial) drop_lease(t);
        return send_slot(t, i, why, why_size);
    }
    return answered(t, i, &answer, t1, r, measure_ns, end_ns, open, why, why_size);
}

static const char *loop_direct(target *t, results *r, int64_t measure_ns, int64_t end_ns, long *open, char *why, size_t why_size) {
    struct pollfd fds[MAX_LINKS];
    oi_link *polled[MAX_LINKS];
    while (*open > 0) {
        for (size_t i = t->n_links; i-- > 0;)
            if (t->links[i]->draining && t->links[i]->outstanding == 0) close_link(t, t->links[i]); /* GOAWAY, all answered */
        size_t n_fds = 0;
        for (size_t i = 0; i < t->n_links; i++) {
            fds[n_fds] = (struct pollfd){t->links[i]->fd, POLLIN, 0};
            polled[n_fds++] = t->links[i];
        }
        if (n_fds == 0) return "no worker connection left";
        if (poll(fds, n_fds, 10000) <= 0) return errno == EINTR ? NULL : "no reply within 10 s";
        for (size_t k = 0; k < n_fds; k++) {
            if (!fds[k].revents) continue;
            oi_link *link = polled[k];
            int rc = oi_link_fill(link);
            const oi_frame *frames;
            size_t n;
            int got = 0;
            while (rc == OI_LINK_OK && (got = oi_link_next(link, &frames, &n)) == 1)
                if (on_link_message(t, link, frames, n, r, measure_ns, end_ns, open, why, why_size) != 0) return why;
            if (rc != OI_LINK_OK || got < 0) {
                if (link_closed(t, link, r, measure_ns, end_ns, open, why, why_size) != 0) return why;
                break; /* the link table changed: poll again */
            }
        }
    }
    return NULL;
}

static const char *closed_loop(target *t, long inflight, int64_t start_ns, int64_t measure_ns, int64_t end_ns, const char *path) {
    static char why[256];
    if (inflight < 1 || inflight > MAX_INFLIGHT) return "inflight out of range";
    t->leases = t->resent = t->goaways = t->links_lost = 0;
    while (now_ns() < start_ns) {
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
    n_slots = inflight;
    for (long i = 0; i < inflight; i++)
        if (send_slot(t, i, why, sizeof why) != 0) return why;
    results r;
    memset(&r, 0, sizeof r);
    long open = inflight;
    const char *error = t->path == PATH_DIRECT ? loop_direct(t, &r, measure_ns, end_ns, &open, why, sizeof why)
                                               : loop_front_door(t, &r, measure_ns, end_ns, &open, why, sizeof why);
    if (!error && write_results(&r, t, path) != 0) error = "cannot write the results file";
    free_results(&r);
    return error;
}

/* ---- targets ---------------------------------------------------------------------------------------- */

static target *target_for(const char *address) {
    for (size_t i = 0; i < n_targets; i++)
        if (strcmp(targets[i].address, address) == 0) return &targets[i];
    if (n_targets == MAX_TARGETS) return NULL;
    void *socket = zmq_socket(context, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(socket, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(socket, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(socket, ZMQ_RCVHWM, &zero, sizeof zero);
    if (zmq_connect(socket, address) != 0) {
        zmq_close(socket);
        return NULL;
    }
    target *t = &targets[n_targets++];
    memset(t, 0, sizeof *t);
    snprintf(t->address, sizeof t->address, "%s", address);
    t->socket = socket;
    return t;
}

/* Choose the target's path (once) and warm it up. NULL, or why not. */
static const char *prepare(target *t) {
    static char why[256];
    if (t->path != PATH_AUTO) return NULL;
    t->path = PATH_FRONT_DOOR;
    if (wanted_path != PATH_FRONT_DOOR && strncmp(t->address, "ipc://", 6) == 0) {
        if (renew(t, why, sizeof why) == 0) {
            t->path = PATH_DIRECT;
        } else { /* no lease (an older daemon, pool.direct off, no such model ...): the front door */
            while (t->n_links) close_link(t, t->links[0]);
            drop_lease(t);
            if (wanted_path == PATH_DIRECT) return why;
        }
    } else if (wanted_path == PATH_DIRECT) {
        return "--direct needs an ipc:// address";
    }
    n_slots = 1;
    results scratch;
    memset(&scratch, 0, sizeof scratch);
    long open = 1;
    for (int i = 0; i < WARMUP; i++) { /* one at a time: the same code as a run at c=1 */
        open = 1;
        if (send_slot(t, 0, why, sizeof why) != 0) return why;
        const char *error = t->path == PATH_DIRECT ? loop_direct(t, &scratch, 0, 0, &open, why, sizeof why)
                                                   : loop_front_door(t, &scratch, 0, 0, &open, why, sizeof why);
        if (error) return error;
    }
    free_results(&scratch);
    return NULL;
}

int main(int argc, char **argv) {
    int first = 1;
    for (; first < argc && strncmp(argv[first], "--", 2) == 0; first++) {
        if (strcmp(argv[first], "--front-door") == 0) wanted_path = PATH_FRONT_DOOR;
        else if (strcmp(argv[first], "--direct") == 0) wanted_path = PATH_DIRECT;
        else if (strcmp(argv[first], "--distinct") == 0) distinct = 1;
        else break;
    }
    if (argc - first != 4) {
        fprintf(stderr, "usage: cwire [--front-door | --direct] [--distinct] MODEL INPUT ROWS COLS  (then commands on stdin; see the top of cwire.c)\n");
        return 2;
    }
    model = argv[first];
    input = argv[first + 1];
    rows = atol(argv[first + 2]);
    cols = atol(argv[first + 3]);
    if (rows < 1 || cols < 1) {
        fprintf(stderr, "cwire: ROWS and COLS must be positive\n");
        return 2;
    }
    if (!pack_header()) {
        fprintf(stderr, "cwire: MODEL and INPUT names too long\n");
        return 2;
    }
    payload_bytes = (size_t)rows * (size_t)cols * sizeof(float);
    payload = malloc(payload_bytes);
    for (size_t i = 0; i < (size_t)(rows * cols); i++) payload[i] = 1.0f;
    context = zmq_ctx_new();
    char line[2048], address[512], path[1024];
    while (fgets(line, sizeof line, stdin)) {
        long inflight;
        long long start_ns, measure_ns, end_ns;
        const char *error = NULL;
        target *t = NULL;
        if (strncmp(line, "quit", 4) == 0) break;
        if (sscanf(line, "prepare %511s", address) == 1) {
            t = target_for(address);
            error = t ? prepare(t) : "cannot connect";
            if (!error) {
                printf("ok %s\n", PATH_NAMES[t->path]);
                fflush(stdout);
                continue;
            }
        } else if (sscanf(line, "run %511s %ld %lld %lld %lld %1023s", address, &inflight, &start_ns, &measure_ns, &end_ns, path) == 6) {
            t = target_for(address);
            error = !t ? "cannot connect" : t->path == PATH_AUTO ? "run before prepare" : closed_loop(t, inflight, start_ns, measure_ns, end_ns, path);
        } else {
            error = "unknown command";
        }
        if (error) printf("error %s\n", error);
        else printf("ok\n");
        fflush(stdout);
    }
    for (size_t i = 0; i < n_targets; i++) {
        while (targets[i].n_links) close_link(&targets[i], targets[i].links[0]);
        drop_lease(&targets[i]);
        zmq_close(targets[i].socket);
    }
    zmq_ctx_term(context);
    free(payload);
    return 0;
}
