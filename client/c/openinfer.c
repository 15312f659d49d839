/*
 * openinfer.c - C client for the OpenInfer wire protocol v1 (docs/PROTOCOL.md). See openinfer.h.
 */
#define _POSIX_C_SOURCE 200809L

#include "openinfer.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <msgpack.h>
#include <zmq.h>

#include "direct_path.h"
#include "lease.h"
#include "reply_header.h"

#define OI_DEFAULT_TIMEOUT_MS 30000
#define OI_MAX_HEADER_BYTES 65536 /* PROTOCOL.md 2.5 / 9 */
#define OI_MAX_TENSORS 256        /* 257 frames including the header */
#define OI_HWM 1000
/* A front-door request with more tensor bytes than this is checked against the daemon's limit first
 * (the first such request asks `health` for it, once): smaller ones are under any default. */
#define OI_LARGE_REQUEST_BYTES (1u << 20)

struct oi_client {
    void *ctx;
    void *sock;
    void *monitor;      /* PAIR socket receiving sock's ZMQ_EVENT_DISCONNECTED (a libzmq socket monitor) */
    unsigned monitors;  /* monitors made so far: each gets its own inproc address */
    uint64_t disconnects; /* DISCONNECTED events seen */
    char *address;
    int timeout_ms;
    uint64_t next_id;
    int curve;
    int direct_wanted;  /* 1 unless turned off (oi_set_direct, OPENINFER_DIRECT=0) */
    oi_direct *direct;  /* the direct path's leases and worker connections (ipc:// without CURVE) */
    uint64_t max_reply_bytes; /* the largest reply frame taken (front door: ZMQ_MAXMSGSIZE; direct path: with the lease's) */
    int door_limit_known;            /* `health` was asked for the front door's limits */
    uint64_t door_max_request_bytes; /* its limits.max_request_bytes (0: it named none) */
    char server_public[41];
    char client_public[41];
    char client_secret[41];
};

/* ---- small helpers --------------------------------------------------------------------------- */

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int remaining_ms(int64_t deadline) {
    int64_t left = deadline - now_ms();
    if (left < 0) return 0;
    if (left > 1000000000) return 1000000000;
    return (int)left;
}

static char *dup_n(const char *s, size_t n) {
    char *copy = malloc(n + 1);
    if (!copy) return NULL;
    if (n) memcpy(copy, s, n);
    copy[n] = '\0';
    return copy;
}

/* Copy at most cap-1 bytes of text, never cutting a UTF-8 sequence in half. */
static void copy_text(char *dst, size_t cap, const char *src, size_t n) {
    if (n >= cap) {
        n = cap - 1;
        while (n > 0 && ((unsigned char)src[n] & 0xC0) == 0x80) n--;
    }
    memcpy(dst, src, n);
    dst[n] = '\0';
}

static int set_error(oi_error *err, int local, int rc, const char *code, const char *fmt, ...) {
    if (!err) return rc;
    err->local = local;
    copy_text(err->code, sizeof err->code, code, strlen(code));
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return rc;
}

#define LOCAL_ERR(err, rc, code, ...) set_error((err), 1, (rc), (code), __VA_ARGS__)
#define E_TIMEOUT(err, ...) LOCAL_ERR(err, OI_ERR_TIMEOUT, "DEADLINE_EXCEEDED", __VA_ARGS__)
#define E_TRANSPORT(err, ...) LOCAL_ERR(err, OI_ERR_TRANSPORT, "UNAVAILABLE", __VA_ARGS__)
#define E_PROTOCOL(err, ...) LOCAL_ERR(err, OI_ERR_PROTOCOL, "INTERNAL", __VA_ARGS__)
#define E_INVALID(err, ...) LOCAL_ERR(err, OI_ERR_INVALID_ARGUMENT, "INVALID_ARGUMENT", __VA_ARGS__)
#define E_NOMEM(err) LOCAL_ERR(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", "out of memory")

/* Strict UTF-8 (no overlong forms, no surrogates, at most U+10FFFF), as the daemon checks (3). */
static int utf8_valid(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    while (p < end) {
        unsigned c = *p++;
        if (c < 0x80) continue;
        unsigned need, min;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) { need = 1; cp = c & 0x1F; min = 0x80; }
        else if (c >= 0xE0 && c <= 0xEF) { need = 2; cp = c & 0x0F; min = 0x800; }
        else if (c >= 0xF0 && c <= 0xF4) { need = 3; cp = c & 0x07; min = 0x10000; }
        else return 0;
        if ((size_t)(end - p) < need) return 0;
        for (unsigned i = 0; i < need; i++) {
            if ((p[i] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (p[i] & 0x3F);
        }
        p += need;
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    }
    return 1;
}

static const struct {
    const char *code;
    int rc;
} CODES[] = {
    {"INVALID_ARGUMENT", OI_ERR_INVALID_ARGUMENT}, {"NOT_FOUND", OI_ERR_NOT_FOUND},
    {"RESOURCE_EXHAUSTED", OI_ERR_RESOURCE_EXHAUSTED}, {"DEADLINE_EXCEEDED", OI_ERR_DEADLINE_EXCEEDED},
    {"WORKER_CRASHED", OI_ERR_WORKER_CRASHED}, {"UNAVAILABLE", OI_ERR_UNAVAILABLE},
    {"PERMISSION_DENIED", OI_ERR_PERMISSION_DENIED}, {"INTERNAL", OI_ERR_INTERNAL},
};

int oi_code_to_rc(const char *code) {
    for (size_t i = 0; code && i < sizeof CODES / sizeof CODES[0]; i++)
        if (strcmp(code, CODES[i].code) == 0) return CODES[i].rc;
    return OI_ERR_INTERNAL;
}

const char *oi_rc_name(int rc) {
    if (rc == OI_OK) return "OK";
    for (size_t i = 0; i < sizeof CODES / sizeof CODES[0]; i++)
        if (CODES[i].rc == rc) return CODES[i].code;
    switch (rc) {
    case OI_ERR_TIMEOUT: return "TIMEOUT";
    case OI_ERR_TRANSPORT: return "TRANSPORT";
    case OI_ERR_PROTOCOL: return "PROTOCOL";
    default: return "?";
    }
}

static const struct {
    const char *name;
    size_t size;
} DATATYPES[] = {
    {"BOOL", 1}, {"UINT8", 1}, {"UINT16", 2}, {"UINT32", 4}, {"UINT64", 8}, {"INT8", 1}, {"INT16", 2},
    {"INT32", 4}, {"INT64", 8}, {"FP16", 2}, {"FP32", 4}, {"FP64", 8}, {"BF16", 2}, {"BYTES", 0},
};

size_t oi_datatype_size(const char *datatype) {
    for (size_t i = 0; datatype && i < sizeof DATATYPES / sizeof DATATYPES[0]; i++)
        if (strcmp(datatype, DATATYPES[i].name) == 0) return DATATYPES[i].size;
    return 0;
}

static uint64_t random_u64(void) {
    uint64_t v = 0;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t got = read(fd, &v, sizeof v);
        close(fd);
        if (got == (ssize_t)sizeof v) return v >> 1; /* keep far from wrapping; any start is fine */
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ ((uint64_t)getpid() << 40);
}

/* ---- msgpack reading ------------------------------------------------------------------------- */


static int obj_uint(const msgpack_object *o, uint64_t *v) {
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER) return 0;
    *v = o->via.u64;
    return 1;
}

static int obj_number(const msgpack_object *o, double *v) {
    switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: *v = o->via.f64; return 1;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: *v = (double)o->via.u64; return 1;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: *v = (double)o->via.i64; return 1;
    default: return 0;
    }
}

/* OI_OK, or RESOURCE_EXHAUSTED when a reply's header (frame 0) is over `limit`: it is not decoded (a
 * reply's `outputs` and `error` are small; 128 MiB of nils in a header once cost 3.2 GiB decoded). */
static int check_header_size(size_t size, uint64_t limit, const char *address, oi_error *err) {
    if (size <= limit) return OI_OK;
    return LOCAL_ERR(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED",
                     "the reply header from %s is %zu bytes, over this client's limit of %" PRIu64 " bytes for a reply header "
                     "(OI_MAX_REPLY_HEADER_BYTES for infer, OI_MAX_OP_REPLY_HEADER_BYTES for other operations)",
                     address, size, limit);
}

/* ---- JSON rendering of msgpack objects --------------------------------------------------------- */

typedef struct {
    char *p;
    size_t n, cap;
    int failed;
} strbuf;

static void sb_put(strbuf *b, const char *s, size_t n) {
    if (b->failed) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) { b->failed = 1; return; }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_puts(strbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void json_string(strbuf *b, const char *s, size_t n) {
    sb_put(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '"' || c == '\\') { esc[0] = '\\'; esc[1] = (char)c; sb_put(b, esc, 2); }
        else if (c < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", c); sb_put(b, esc, 6); }
        else sb_put(b, (const char *)&s[i], 1);
    }
    sb_put(b, "\"", 1);
}

static void json_value(strbuf *b, const msgpack_object *o) {
    char num[64];
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: sb_puts(b, "null"); break;
    case MSGPACK_OBJECT_BOOLEAN: sb_puts(b, o->via.boolean ? "true" : "false"); break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: snprintf(num, sizeof num, "%" PRIu64, o->via.u64); sb_puts(b, num); break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: snprintf(num, sizeof num, "%" PRId64, o->via.i64); sb_puts(b, num); break;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        if (isfinite(o->via.f64)) { snprintf(num, sizeof num, "%.17g", o->via.f64); sb_puts(b, num); }
        else sb_puts(b, "null");
        break;
    case MSGPACK_OBJECT_STR: json_string(b, o->via.str.ptr, o->via.str.size); break;
    case MSGPACK_OBJECT_BIN:
        sb_put(b, "\"", 1);
        for (uint32_t i = 0; i < o->via.bin.size; i++) {
            snprintf(num, sizeof num, "%02x", (unsigned char)o->via.bin.ptr[i]);
            sb_put(b, num, 2);
        }
        sb_put(b, "\"", 1);
        break;
    case MSGPACK_OBJECT_ARRAY:
        sb_put(b, "[", 1);
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            if (i) sb_put(b, ",", 1);
            json_value(b, &o->via.array.ptr[i]);
        }
        sb_put(b, "]", 1);
        break;
    case MSGPACK_OBJECT_MAP:
        sb_put(b, "{", 1);
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object *k = &o->via.map.ptr[i].key;
            if (i) sb_put(b, ",", 1);
            if (k->type == MSGPACK_OBJECT_STR) json_value(b, k);
            else { /* JSON keys are strings: quote the key's own rendering */
                strbuf kb = {0};
                json_value(&kb, k);
                json_string(b, kb.p ? kb.p : "", kb.n);
                free(kb.p);
            }
            sb_put(b, ":", 1);
            json_value(b, &o->via.map.ptr[i].val);
        }
        sb_put(b, "}", 1);
        break;
    default: sb_puts(b, "null"); break; /* ext: not used by the protocol */
    }
}

static char *json_of(const msgpack_object *o) {
    strbuf b = {0};
    json_value(&b, o);
    if (b.failed) { free(b.p); return NULL; }
    return b.p;
}

/* ---- socket ---------------------------------------------------------------------------------- */

/* Stop and close the monitor of the front door socket (before the socket itself is closed). */
static void close_monitor(oi_client *c) {
    if (!c->monitor) return;
    if (c->sock) zmq_socket_monitor(c->sock, NULL, 0);
    zmq_close(c->monitor);
    c->monitor = NULL;
}

/* A libzmq socket monitor on the front door socket: its DISCONNECTED events tell a call waiting for a
 * reply that the connection dropped (the reply will never come), so it fails at once instead of at its
 * timeout. Without a monitor (it could not be made) calls simply wait for their timeout. */
static void open_monitor(oi_client *c) {
    char address[64];
    snprintf(address, sizeof address, "inproc://openinfer-monitor-%u", c->monitors++);
    if (zmq_socket_monitor(c->sock, address, ZMQ_EVENT_DISCONNECTED) != 0) return;
    void *pair = zmq_socket(c->ctx, ZMQ_PAIR);
    int zero = 0;
    if (!pair || zmq_setsockopt(pair, ZMQ_LINGER, &zero, sizeof zero) || zmq_connect(pair, address) != 0) {
        if (pair) zmq_close(pair);
        zmq_socket_monitor(c->sock, NULL, 0);
        return;
    }
    c->monitor = pair;
}

/* Read the monitor's pending events; returns how many were DISCONNECTED. */
static unsigned read_monitor(oi_client *c) {
    unsigned disconnected = 0;
    while (c->monitor) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, c->monitor, ZMQ_DONTWAIT) < 0) { zmq_msg_close(&m); break; }
        if (zmq_msg_size(&m) >= 2) {
            uint16_t event;
            memcpy(&event, zmq_msg_data(&m), sizeof event); /* frame 1: event (u16), value (u32), host order */
            if (event == ZMQ_EVENT_DISCONNECTED) disconnected++;
        }
        int more = zmq_msg_more(&m);
        zmq_msg_close(&m);
        while (more) { /* frame 2: the endpoint */
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, c->monitor, ZMQ_DONTWAIT) < 0) more = 0;
            else more = zmq_msg_more(&m);
            zmq_msg_close(&m);
        }
    }
    c->disconnects += disconnected;
    return disconnected;
}

static int open_socket(oi_client *c) {
    void *s = zmq_socket(c->ctx, ZMQ_DEALER);
    if (!s) return -1;
    int zero = 0, one = 1, hwm = OI_HWM, sndtimeo = 1000;
    /* A frame over it closes the connection as its length arrives, before libzmq allocates it: what a
     * daemon (or whatever listens at the address) declares cannot take this process's memory. */
    int64_t max_message = (int64_t)c->max_reply_bytes;
    if (zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero) || zmq_setsockopt(s, ZMQ_IMMEDIATE, &one, sizeof one) ||
        zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof hwm) || zmq_setsockopt(s, ZMQ_RCVHWM, &hwm, sizeof hwm) ||
        zmq_setsockopt(s, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo) || zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &max_message, sizeof max_message))
        goto fail;
    if (c->curve && (zmq_setsockopt(s, ZMQ_CURVE_SERVERKEY, c->server_public, 40) ||
                     zmq_setsockopt(s, ZMQ_CURVE_PUBLICKEY, c->client_public, 40) ||
                     zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, c->client_secret, 40)))
        goto fail;
    if (zmq_connect(s, c->address) != 0) goto fail;
    c->sock = s;
    open_monitor(c);
    return 0;
fail:;
    int saved = errno;
    zmq_close(s);
    errno = saved;
    return -1;
}

/* Drop the connection (and anything half-sent or queued on it) and connect a fresh socket. */
static int reset_socket(oi_client *c) {
    close_monitor(c);
    if (c->sock) zmq_close(c->sock);
    c->sock = NULL;
    return open_socket(c);
}

static char *resolve_address(const char *address) {
    if (address && *address) return dup_n(address, strlen(address));
    const char *env = getenv("OPENINFER_SOCKET");
    if (env && *env) return dup_n(env, strlen(env));
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    const char *fmt = "ipc://%s/openinfer/openinfer.sock";
    if (!xdg || !*xdg) { xdg = ""; fmt = "ipc:///run/openinfer/openinfer.sock"; }
    size_t n = strlen(fmt) + strlen(xdg) + 1;
    char *out = malloc(n);
    if (out) snprintf(out, n, fmt, xdg);
    return out;
}

oi_client *oi_connect(const char *address, int timeout_ms) {
    oi_client *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->address = resolve_address(address);
    c->timeout_ms = timeout_ms > 0 ? timeout_ms : OI_DEFAULT_TIMEOUT_MS;
    c->max_reply_bytes = OI_DEFAULT_MAX_REPLY_BYTES;
    c->next_id = random_u64();
    const char *direct = getenv("OPENINFER_DIRECT");
    c->direct_wanted = !(direct && strcmp(direct, "0") == 0);
    if (!c->address) goto fail;
    c->ctx = zmq_ctx_new();
    if (!c->ctx || open_socket(c) != 0) goto fail;
    return c;
fail:;
    int saved = errno;
    oi_close(c);
    errno = saved;
    return NULL;
}

static int z85_key_ok(const char *k) {
    if (!k || strlen(k) != 40) return 0;
    uint8_t bin[32];
    return zmq_z85_decode(bin, k) != NULL;
}

int oi_set_curve(oi_client *c, const char *server_public_z85, const char *client_public_z85,
                 const char *client_secret_z85) {
    if (!c) { errno = EINVAL; return OI_ERR_INVALID_ARGUMENT; }
    if (!zmq_has("curve")) { errno = ENOTSUP; return OI_ERR_INVALID_ARGUMENT; }
    if (!z85_key_ok(server_public_z85) || !z85_key_ok(client_public_z85) || !z85_key_ok(client_secret_z85)) {
        errno = EINVAL;
        return OI_ERR_INVALID_ARGUMENT;
    }
    memcpy(c->server_public, server_public_z85, 41);
    memcpy(c->client_public, client_public_z85, 41);
    memcpy(c->client_secret, client_secret_z85, 41);
    c->curve = 1;
    oi_direct_free(c->direct); /* CURVE is for tcp://: the direct path is for local clients */
    c->direct = NULL;
    return reset_socket(c) == 0 ? OI_OK : OI_ERR_TRANSPORT;
}

int oi_set_direct(oi_client *c, int enabled) {
    if (!c) return OI_ERR_INVALID_ARGUMENT;
    c->direct_wanted = enabled != 0;
    if (!enabled) {
        oi_direct_free(c->direct); /* its worker connections close now */
        c->direct = NULL;
    }
    return OI_OK;
}

int oi_set_max_reply_bytes(oi_client *c, uint64_t max_reply_bytes) {
    if (!c || max_reply_bytes == 0 || max_reply_bytes > (uint64_t)INT64_MAX) return OI_ERR_INVALID_ARGUMENT;
    c->max_reply_bytes = max_reply_bytes;
    if (c->direct) oi_direct_set_max_reply_bytes(c->direct, max_reply_bytes);
    return reset_socket(c) == 0 ? OI_OK : OI_ERR_TRANSPORT; /* ZMQ_MAXMSGSIZE is read at connect */
}

void oi_set_timeout(oi_client *c, int timeout_ms) {
    if (c) c->timeout_ms = timeout_ms > 0 ? timeout_ms : OI_DEFAULT_TIMEOUT_MS;
}

const char *oi_address(const oi_client *c) { return c ? c->address : NULL; }

void oi_close(oi_client *c) {
    if (!c) return;
    oi_direct_free(c->direct);
    close_monitor(c);
    if (c->sock) zmq_close(c->sock);
    if (c->ctx) zmq_ctx_term(c->ctx);
    memset(c->client_secret, 0, sizeof c->client_secret);
    free(c->address);
    free(c);
}

/* ---- sending and receiving ------------------------------------------------------------------- */

/* Send one multipart message. The first frame waits (until `deadline`) for a connected daemon:
 * with ZMQ_IMMEDIATE a DEALER only queues on a completed connection (PROTOCOL.md 2.4, 14.5). */
static int send_frames(oi_client *c, const oi_frame *frames, size_t n, int64_t deadline, oi_error *err,
                       int64_t *sent_us) {
    if (!c->sock && open_socket(c) != 0) /* an earlier reset failed */
        return E_TRANSPORT(err, "cannot open a socket for %s: %s", c->address, zmq_strerror(errno));
    for (;;) {
        int flags = ZMQ_DONTWAIT | (n > 1 ? ZMQ_SNDMORE : 0);
        if (sent_us) *sent_us = now_us(); /* before the bytes can possibly reach the daemon */
        if (zmq_send(c->sock, frames[0].data, frames[0].size, flags) >= 0) break;
        if (errno == EINTR) continue;
        if (errno != EAGAIN) return E_TRANSPORT(err, "cannot send to %s: %s", c->address, zmq_strerror(errno));
        int left = remaining_ms(deadline);
        if (left <= 0)
            return E_TRANSPORT(err, "no daemon connected at %s (is it running, and may this user connect?)", c->address);
        zmq_pollitem_t item = {c->sock, 0, ZMQ_POLLOUT, 0};
        if (zmq_poll(&item, 1, left) < 0 && errno != EINTR)
            return E_TRANSPORT(err, "zmq_poll: %s", zmq_strerror(errno));
    }
    /* The rest of a multipart message is accepted at once once its first frame was (SNDTIMEO guards). */
    for (size_t i = 1; i < n; i++) {
        int flags = i + 1 < n ? ZMQ_SNDMORE : 0;
        while (zmq_send(c->sock, frames[i].data, frames[i].size, flags) < 0) {
            if (errno == EINTR) continue;
            int saved = errno;
            reset_socket(c); /* never leave half a message on the socket */
            return E_TRANSPORT(err, "cannot send frame %zu to %s: %s", i, c->address, zmq_strerror(saved));
        }
    }
    return OI_OK;
}

typedef struct {
    zmq_msg_t *msgs;
    size_t n, cap;
} msgvec;

static void msgvec_free(msgvec *v) {
    for (size_t i = 0; i < v->n; i++) zmq_msg_close(&v->msgs[i]);
    free(v->msgs);
    v->msgs = NULL;
    v->n = v->cap = 0;
}

/* Receive one whole multipart message that is ready (after POLLIN). */
static int recv_message(oi_client *c, msgvec *v, int flags, oi_error *err) {
    v->n = 0;
    for (;;) {
        if (v->n == v->cap) {
            size_t cap = v->cap ? v->cap * 2 : 8;
            zmq_msg_t *m = realloc(v->msgs, cap * sizeof *m);
            if (!m) { msgvec_free(v); return E_NOMEM(err); }
            v->msgs = m;
            v->cap = cap;
        }
        zmq_msg_t *m = &v->msgs[v->n];
        zmq_msg_init(m);
        if (zmq_msg_recv(m, c->sock, flags) < 0) {
            int saved = errno;
            zmq_msg_close(m);
            if (saved == EINTR && v->n > 0) continue;
            msgvec_free(v);
            errno = saved;
            return saved == EAGAIN ? OI_ERR_TIMEOUT : E_TRANSPORT(err, "zmq_msg_recv: %s", zmq_strerror(saved));
        }
        v->n++;
        if (!zmq_msg_more(m)) return OI_OK;
        flags = 0; /* the other frames of a message are already here */
    }
}

#define OI_DISCONNECTED 1 /* wait_message: the connection dropped while waiting (no error text) */

/* Wait until `deadline` for the next message. OI_ERR_TIMEOUT (no error text) when none came;
 * OI_DISCONNECTED once the connection dropped after the monitor's count `since` and no message is left
 * to read (a reply that arrived before the drop is still taken). */
static int wait_message(oi_client *c, msgvec *v, int64_t deadline, uint64_t since, oi_error *err) {
    for (;;) {
        if (c->disconnects > since) {
            int rc = recv_message(c, v, ZMQ_DONTWAIT, err);
            return rc == OI_ERR_TIMEOUT ? OI_DISCONNECTED : rc;
        }
        zmq_pollitem_t items[2] = {{c->sock, 0, ZMQ_POLLIN, 0}, {c->monitor, 0, ZMQ_POLLIN, 0}};
        int r = zmq_poll(items, c->monitor ? 2 : 1, remaining_ms(deadline));
        if (r < 0) {
            if (errno == EINTR) continue;
            return E_TRANSPORT(err, "zmq_poll: %s", zmq_strerror(errno));
        }
        if (c->monitor && (items[1].revents & ZMQ_POLLIN)) read_monitor(c);
        if (items[0].revents & ZMQ_POLLIN) {
            int rc = recv_message(c, v, ZMQ_DONTWAIT, err);
            if (rc != OI_ERR_TIMEOUT) return rc; /* spurious wake-up: poll again */
        }
        if (c->disconnects == since && remaining_ms(deadline) <= 0) return OI_ERR_TIMEOUT;
    }
}

/* Discard the messages waiting, until `deadline` (a daemon that keeps sending cannot keep us here). */
static void drain(oi_client *c, int64_t deadline) {
    msgvec v = {0};
    if (!c->sock) return;
    while (now_ms() < deadline && recv_message(c, &v, ZMQ_DONTWAIT, NULL) == OI_OK) msgvec_free(&v);
    msgvec_free(&v);
}

static uint64_t new_id(oi_client *c) { return c->next_id++; }

static void pack_str(msgpack_packer *pk, const char *s) {
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

/* Fire-and-forget cancel of `target` (PROTOCOL.md 10.4); its reply is discarded like any other. */
static void send_cancel(oi_client *c, uint64_t target) {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 4);
    pack_str(&pk, "v");
    msgpack_pack_uint64(&pk, 1);
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, new_id(c));
    pack_str(&pk, "op");
    pack_str(&pk, "cancel");
    pack_str(&pk, "target");
    msgpack_pack_uint64(&pk, target);
    if (sb.data) zmq_send(c->sock, sb.data, sb.size, ZMQ_DONTWAIT);
    msgpack_sbuffer_destroy(&sb);
}

/* Read the `id` of a reply header; 0 if nil/absent/not an unsigned integer. */
static int header_id(const msgpack_object *h, uint64_t *id) { return obj_uint(oi_map_get(h, "id"), id); }

/*
 * Send `frames` (a request with id `id`) and wait for the reply carrying `id`, discarding every
 * other message (late replies, cancel answers, replies with a nil id). On success `v` holds the
 * reply and `u` its decoded header (a map). On timeout a cancel for `id` is sent. A header over
 * `max_header` bytes fails the call, RESOURCE_EXHAUSTED, undecoded (whose reply it was cannot be known:
 * no daemon sends one).
 */
static int exchange(oi_client *c, uint64_t id, const oi_frame *frames, size_t n, int send_budget_ms,
                    int reply_budget_ms, uint64_t max_header, msgvec *v, msgpack_unpacked *u, oi_error *err, double *elapsed_us) {
    int64_t start = now_ms();
    int64_t sent_us = 0;
    read_monitor(c); /* drops before this request are not its concern */
    uint64_t since = c->disconnects;
    int rc = send_frames(c, frames, n, start + send_budget_ms, err, &sent_us);
    if (rc != OI_OK) return rc;
    int64_t deadline = start + reply_budget_ms;
    for (;;) {
        rc = wait_message(c, v, deadline, since, err);
        if (rc == OI_ERR_TIMEOUT) {
            send_cancel(c, id);
            return E_TIMEOUT(err, "no reply from %s within %d ms", c->address, reply_budget_ms);
        }
        if (rc == OI_DISCONNECTED) /* libzmq reconnects by itself; this request's reply is lost */
            return E_TRANSPORT(err, "the connection to the daemon at %s closed while this request was in flight (it may or may not have run; "
                               "a reply frame over this client's max_reply_bytes, %llu bytes, closes it too)",
                               c->address, (unsigned long long)c->max_reply_bytes);
        if (rc != OI_OK) return rc;
        if (v->n > 0 && (rc = check_header_size(zmq_msg_size(&v->msgs[0]), max_header, c->address, err)) != OI_OK) {
            msgvec_free(v);
            return rc;
        }
        uint64_t got;
        if (v->n > 0 && oi_unpack_one(u, zmq_msg_data(&v->msgs[0]), zmq_msg_size(&v->msgs[0])) &&
            u->data.type == MSGPACK_OBJECT_MAP && header_id(&u->data, &got) && got == id) {
            if (elapsed_us) *elapsed_us = (double)(now_us() - sent_us);
            return OI_OK;
        }
        /* not ours: a late reply, a cancel's answer, or undecodable; drop it */
        msgpack_unpacked_destroy(u);
        msgvec_free(v);
        if (now_ms() >= deadline) { /* the deadline holds even while messages keep coming */
            send_cancel(c, id);
            return E_TIMEOUT(err, "no reply from %s within %d ms", c->address, reply_budget_ms);
        }
    }
}

/* Copy error.{code,message,details} of a reply header. Returns the matching return code. */
static int read_error(const msgpack_object *e, oi_error *err, char **details) {
    const msgpack_object *code = oi_map_get(e, "code"), *msg = oi_map_get(e, "message");
    if (e->type != MSGPACK_OBJECT_MAP || !code || code->type != MSGPACK_OBJECT_STR)
        return E_PROTOCOL(err, "reply has an error without a str code");
    err->local = 0;
    copy_text(err->code, sizeof err->code, code->via.str.ptr, code->via.str.size);
    if (msg && msg->type == MSGPACK_OBJECT_STR) copy_text(err->message, sizeof err->message, msg->via.str.ptr, msg->via.str.size);
    else err->message[0] = '\0';
    const msgpack_object *d = oi_map_get(e, "details");
    if (details && d && d->type != MSGPACK_OBJECT_NIL) *details = json_of(d);
    /* an unknown code keeps its string but maps to OI_ERR_INTERNAL (PROTOCOL.md 8.1) */
    return oi_code_to_rc(err->code);
}

/* ---- infer ----------------------------------------------------------------------------------- */

static void result_init(oi_result *r) {
    memset(r, 0, sizeof *r);
    r->version = -1;
    r->batch_size = -1;
    r->cache = -1;
    r->queue_us = r->compute_us = r->total_us = r->client_us = r->transport_us = NAN;
}

void oi_result_free(oi_result *r) {
    if (!r) return;
    for (size_t i = 0; i < r->n_outputs; i++) {
        free(r->outputs[i].name);
        free(r->outputs[i].datatype);
        free(r->outputs[i].shape);
        free(r->outputs[i].data);
    }
    free(r->outputs);
    for (size_t i = 0; i < r->n_timing; i++) free(r->timing[i].name);
    free(r->timing);
    free(r->model);
    free(r->error_details);
    result_init(r);
}

int oi_infer_bytes(oi_client *c, const char *model, const char *input_name, const void *data, size_t len, oi_result *out) {
    if (!out) return OI_ERR_INVALID_ARGUMENT;
    if (!input_name || (len && !data) || len > UINT32_MAX) {
        result_init(out);
        return E_INVALID(&out->error, "oi_infer_bytes: needs an input name and at most 4 GiB - 1 of data");
    }
    unsigned char *wire = malloc(4 + (len ? len : 1)); /* one BYTES element: 4-byte LE length, then the bytes */
    if (!wire) {
        result_init(out);
        return E_NOMEM(&out->error);
    }
    wire[0] = (unsigned char)len, wire[1] = (unsigned char)(len >> 8), wire[2] = (unsigned char)(len >> 16), wire[3] = (unsigned char)(len >> 24);
    if (len) memcpy(wire + 4, data, len);
    oi_tensor input = {input_name, "BYTES", NULL, 0, wire, 4 + len};
    int rc = oi_infer(c, model, -1, &input, 1, out);
    free(wire);
    return rc;
}

const char *oi_output_text(const oi_output *o, size_t *len) {
    if (!o || !o->datatype || strcmp(o->datatype, "BYTES") != 0 || o->nbytes < 4 || !o->data) return NULL;
    const unsigned char *p = o->data;
    size_t n = (size_t)p[0] | (size_t)p[1] << 8 | (size_t)p[2] << 16 | (size_t)p[3] << 24;
    if (n > o->nbytes - 4) return NULL;
    if (len) *len = n;
    return (const char *)p + 4;
}

const char *oi_output_text_at(const oi_output *o, size_t index, size_t *len) {
    if (!o || !o->datatype || strcmp(o->datatype, "BYTES") != 0 || !o->data) return NULL;
    const unsigned char *p = o->data;
    size_t left = o->nbytes;
    for (size_t i = 0;; i++) {  /* each element: 4-byte LE length, then that many bytes, within nbytes */
        if (left < 4) return NULL;
        size_t n = (size_t)p[0] | (size_t)p[1] << 8 | (size_t)p[2] << 16 | (size_t)p[3] << 24;
        if (n > left - 4) return NULL;
        if (i == index) {
            if (len) *len = n;
            return (const char *)p + 4;
        }
        p += 4 + n;
        left -= 4 + n;
    }
}

const oi_output *oi_result_output(const oi_result *r, const char *name) {
    for (size_t i = 0; r && name && i < r->n_outputs; i++)
        if (strcmp(r->outputs[i].name, name) == 0) return &r->outputs[i];
    return NULL;
}

int oi_result_timing(const oi_result *r, const char *name, double *value) {
    for (size_t i = 0; r && name && i < r->n_timing; i++)
        if (strcmp(r->timing[i].name, name) == 0) {
            if (value) *value = r->timing[i].value;
            return 1;
        }
    return 0;
}

static int read_timing(const msgpack_object *t, oi_result *r) {
    if (!t || t->type != MSGPACK_OBJECT_MAP || t->via.map.size == 0) return OI_OK;
    r->timing = calloc(t->via.map.size, sizeof *r->timing);
    if (!r->timing) return E_NOMEM(&r->error);
    for (uint32_t i = 0; i < t->via.map.size; i++) {
        const msgpack_object *k = &t->via.map.ptr[i].key;
        double value;
        if (k->type != MSGPACK_OBJECT_STR || !obj_number(&t->via.map.ptr[i].val, &value)) continue; /* tolerate */
        oi_timing *e = &r->timing[r->n_timing];
        if (!(e->name = dup_n(k->via.str.ptr, k->via.str.size))) return E_NOMEM(&r->error);
        e->value = value;
        r->n_timing++;
        if (strcmp(e->name, "queue_us") == 0) r->queue_us = value;
        else if (strcmp(e->name, "compute_us") == 0) r->compute_us = value;
        else if (strcmp(e->name, "total_us") == 0) r->total_us = value;
    }
    return OI_OK;
}

/* Check a BYTES frame: `count` elements, each a 4-byte little-endian length + bytes, nothing after. */
static int bytes_frame_ok(const unsigned char *p, size_t n, uint64_t count) {
    size_t off = 0;
    for (uint64_t i = 0; i < count; i++) {
        if (n - off < 4) return 0;
        uint32_t len = (uint32_t)p[off] | (uint32_t)p[off + 1] << 8 | (uint32_t)p[off + 2] << 16 | (uint32_t)p[off + 3] << 24;
        off += 4;
        if (n - off < len) return 0;
        off += len;
    }
    return off == n;
}

static int read_output(const msgpack_object *spec, const oi_frame *frame, oi_output *o, oi_error *err, size_t index) {
    const msgpack_object *name = oi_map_get(spec, "name"), *dt = oi_map_get(spec, "datatype"), *shape = oi_map_get(spec, "shape");
    if (!name || name->type != MSGPACK_OBJECT_STR || !dt || dt->type != MSGPACK_OBJECT_STR || !shape ||
        shape->type != MSGPACK_OBJECT_ARRAY)
        return E_PROTOCOL(err, "reply output %zu is not {name: str, datatype: str, shape: array}", index);
    if (!(o->name = dup_n(name->via.str.ptr, name->via.str.size)) || !(o->datatype = dup_n(dt->via.str.ptr, dt->via.str.size)))
        return E_NOMEM(err);
    o->rank = shape->via.array.size;
    if (o->rank && !(o->shape = calloc(o->rank, sizeof *o->shape))) return E_NOMEM(err);
    uint64_t count = 1;
    int overflow = 0;
    for (size_t d = 0; d < o->rank; d++) {
        uint64_t dim;
        if (!obj_uint(&shape->via.array.ptr[d], &dim) || dim > INT64_MAX)
            return E_PROTOCOL(err, "reply output '%s': shape is not concrete", o->name);
        o->shape[d] = (int64_t)dim;
        if (dim && count > UINT64_MAX / dim) overflow = 1;
        count *= dim;
    }
    size_t size = frame->size;
    const unsigned char *data = frame->data;
    size_t elem = oi_datatype_size(o->datatype);
    if (strcmp(o->datatype, "BYTES") == 0) {
        if (overflow || !bytes_frame_ok(data, size, count)) /* a shape whose count wraps is no count */
            return E_PROTOCOL(err, "reply output '%s': BYTES frame does not hold %" PRIu64 " elements", o->name, count);
    } else if (elem) {
        if (overflow || count > UINT64_MAX / elem || count * elem != size)
            return E_PROTOCOL(err, "reply output '%s': frame is %zu bytes, %s x %" PRIu64 " elements needs %" PRIu64,
                              o->name, size, o->datatype, count, count * (uint64_t)elem);
    } /* a datatype this library does not know: no length check */
    o->nbytes = size;
    if (size) {
        if (!(o->data = malloc(size))) return E_NOMEM(err);
        memcpy(o->data, data, size);
    }
    return OI_OK;
}

/* An infer reply: its decoded header `h` and all its frames (frames[0] is the header). */
static int read_infer_reply(const msgpack_object *h, const oi_frame *frames, size_t n_frames, oi_result *r) {
    uint64_t ver;
    if (!obj_uint(oi_map_get(h, "v"), &ver) || ver != 1) return E_PROTOCOL(&r->error, "reply header has no v = 1");
    int rc = read_timing(oi_map_get(h, "timing"), r);
    if (rc != OI_OK) return rc;
    const msgpack_object *e = oi_map_get(h, "error");
    if (e && e->type != MSGPACK_OBJECT_NIL) return read_error(e, &r->error, &r->error_details);
    const msgpack_object *outs = oi_map_get(h, "outputs"), *model = oi_map_get(h, "model"), *bs = oi_map_get(h, "batch_size");
    if (!outs || outs->type != MSGPACK_OBJECT_ARRAY) return E_PROTOCOL(&r->error, "infer reply has neither error nor outputs");
    if (!model || model->type != MSGPACK_OBJECT_STR || !obj_uint(oi_map_get(h, "version"), &ver) || ver > INT64_MAX)
        return E_PROTOCOL(&r->error, "infer reply lacks model (str) or version (integer)");
    if (!(r->model = dup_n(model->via.str.ptr, model->via.str.size))) return E_NOMEM(&r->error);
    r->version = (int64_t)ver;
    uint64_t batch;
    if (obj_uint(bs, &batch) && batch <= INT64_MAX) r->batch_size = (int64_t)batch;
    const msgpack_object *cache = oi_map_get(h, "cache");
    if (cache && cache->type == MSGPACK_OBJECT_STR)
        r->cache = cache->via.str.size == 3 && memcmp(cache->via.str.ptr, "hit", 3) == 0 ? 1 : 0;
    size_t n = outs->via.array.size;
    if (n_frames != n + 1)
        return E_PROTOCOL(&r->error, "infer reply lists %zu outputs but carries %zu data frames", n, n_frames - 1);
    if (n && !(r->outputs = calloc(n, sizeof *r->outputs))) return E_NOMEM(&r->error);
    for (size_t i = 0; i < n; i++) {
        r->n_outputs = i + 1; /* so that oi_result_free frees a partly filled entry */
        rc = read_output(&outs->via.array.ptr[i], &frames[i + 1], &r->outputs[i], &r->error, i);
        if (rc != OI_OK) return rc;
    }
    return OI_OK;
}

/* ---- the direct path (direct_path.c) ------------------------------------------------------------- */

static int fill_reply(msgvec *v, oi_reply *out);

/* How direct_path.c asks the front door for a lease: one frame, the reply with `id` copied into `out`. */
static int front_door_call(void *client, const oi_frame *request, uint64_t id, int64_t deadline_ms, oi_reply *out) {
    oi_client *c = client;
    memset(out, 0, sizeof *out);
    msgvec v = {0};
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    int budget = remaining_ms(deadline_ms);
    int rc = exchange(c, id, request, 1, budget, budget, OI_MAX_OP_REPLY_HEADER_BYTES, &v, &u, &out->error, NULL);
    msgpack_unpacked_destroy(&u);
    if (rc == OI_OK && fill_reply(&v, out) != OI_OK) rc = E_NOMEM(&out->error);
    msgvec_free(&v);
    return rc;
}

/* Whether this infer tries the direct path: ipc://, no CURVE, not turned off, and the daemon has not
 * said it has none. The direct path's state is made on first use. */
static int direct_path(oi_client *c) {
    if (!c->direct_wanted || c->curve || strncmp(c->address, "ipc://", 6) != 0) return 0;
    if (!c->direct) {
        c->direct = oi_direct_new(front_door_call, c, &c->next_id);
        if (c->direct) oi_direct_set_max_reply_bytes(c->direct, c->max_reply_bytes);
    }
    return oi_direct_available(c->direct);
}

static int check_text(const char *what, const char *s, oi_error *err) {
    if (!s) return E_INVALID(err, "%s is NULL", what);
    if (!utf8_valid(s, strlen(s))) return E_INVALID(err, "%s is not valid UTF-8", what);
    return OI_OK;
}

static void reply_init(oi_reply *r);

/* The front door's limit on tensor bytes (PROTOCOL.md 7.4 `limits`), asked once. */
static void ask_door_limit(oi_client *c) {
    oi_reply reply;
    c->door_limit_known = 1;
    c->door_max_request_bytes = 0;
    if (oi_request(c, "health", NULL, &reply) == OI_OK && reply.n_frames) {
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        if (oi_unpack_one(&u, reply.frames[0].data, reply.frames[0].size) && u.data.type == MSGPACK_OBJECT_MAP) {
            const msgpack_object *result = oi_map_get(&u.data, "result");
            const msgpack_object *limits = result && result->type == MSGPACK_OBJECT_MAP ? oi_map_get(result, "limits") : NULL;
            uint64_t limit;
            if (limits && limits->type == MSGPACK_OBJECT_MAP && obj_uint(oi_map_get(limits, "max_request_bytes"), &limit))
                c->door_max_request_bytes = limit;
        }
        msgpack_unpacked_destroy(&u);
    }
    oi_reply_free(&reply);
}

/* OI_DIRECT_USE_FRONT_DOOR (go on) or RESOURCE_EXHAUSTED for a request over the front door's limit,
 * before a byte of it is sent: the daemon would skip it anyway, and past ~1 GiB cut the connection. */
static int check_door_limit(oi_client *c, uint64_t tensor_bytes, oi_error *err) {
    if (tensor_bytes <= OI_LARGE_REQUEST_BYTES) return OI_DIRECT_USE_FRONT_DOOR;
    if (!c->door_limit_known) ask_door_limit(c);
    if (c->door_max_request_bytes && tensor_bytes > c->door_max_request_bytes)
        return LOCAL_ERR(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED",
                         "request carries %" PRIu64 " bytes of tensors; the daemon's limit is %" PRIu64
                         " (server.max_request_bytes): split the request or raise the setting",
                         tensor_bytes, c->door_max_request_bytes);
    return OI_DIRECT_USE_FRONT_DOOR;
}

int oi_infer(oi_client *c, const char *model, int64_t version, const oi_tensor *inputs, size_t n_inputs, oi_result *out) {
    if (!out) return OI_ERR_INVALID_ARGUMENT;
    result_init(out);
    oi_error *err = &out->error;
    if (!c) return E_INVALID(err, "client is NULL");
    /* Faults the daemon would answer with a nil id (invalid UTF-8, oversized header) are caught
     * here: a reply without our id could never be matched to this call. */
    int rc = check_text("model", model, err);
    if (rc != OI_OK) return rc;
    if (version < -1) return E_INVALID(err, "version %" PRId64 " (use >= 0, or -1 for the newest)", version);
    if (n_inputs && !inputs) return E_INVALID(err, "inputs is NULL");
    if (n_inputs > OI_MAX_TENSORS)
        return LOCAL_ERR(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", "%zu inputs: at most %d tensors per request",
                         n_inputs, OI_MAX_TENSORS);
    for (size_t i = 0; i < n_inputs; i++) {
        if ((rc = check_text("input name", inputs[i].name, err)) != OI_OK) return rc;
        if ((rc = check_text("input datatype", inputs[i].datatype, err)) != OI_OK) return rc;
        if (inputs[i].rank && !inputs[i].shape) return E_INVALID(err, "input '%s': shape is NULL", inputs[i].name);
        if (inputs[i].nbytes && !inputs[i].data) return E_INVALID(err, "input '%s': data is NULL", inputs[i].name);
    }

    uint64_t id = new_id(c);
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, version >= 0 ? 7 : 6);
    pack_str(&pk, "v");
    msgpack_pack_uint64(&pk, 1);
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, id);
    pack_str(&pk, "op");
    pack_str(&pk, "infer");
    pack_str(&pk, "model");
    pack_str(&pk, model);
    if (version >= 0) {
        pack_str(&pk, "version");
        msgpack_pack_int64(&pk, version);
    }
    pack_str(&pk, "timeout_ms");
    msgpack_pack_int64(&pk, c->timeout_ms);
    pack_str(&pk, "inputs");
    msgpack_pack_array(&pk, n_inputs);
    for (size_t i = 0; i < n_inputs; i++) {
        msgpack_pack_map(&pk, 3);
        pack_str(&pk, "name");
        pack_str(&pk, inputs[i].name);
        pack_str(&pk, "datatype");
        pack_str(&pk, inputs[i].datatype);
        pack_str(&pk, "shape");
        msgpack_pack_array(&pk, inputs[i].rank);
        for (size_t d = 0; d < inputs[i].rank; d++) msgpack_pack_int64(&pk, inputs[i].shape[d]);
    }
    if (!sb.data) { msgpack_sbuffer_destroy(&sb); return E_NOMEM(err); }
    if (sb.size > OI_MAX_HEADER_BYTES) {
        size_t size = sb.size;
        msgpack_sbuffer_destroy(&sb);
        return LOCAL_ERR(err, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED",
                         "request header is %zu bytes, over the %d-byte limit", size, OI_MAX_HEADER_BYTES);
    }

    oi_frame *frames = malloc((n_inputs + 1) * sizeof *frames);
    if (!frames) { msgpack_sbuffer_destroy(&sb); return E_NOMEM(err); }
    frames[0].data = sb.data;
    frames[0].size = sb.size;
    uint64_t tensor_bytes = 0;
    for (size_t i = 0; i < n_inputs; i++) {
        frames[i + 1].data = inputs[i].data;
        frames[i + 1].size = inputs[i].nbytes;
        tensor_bytes += inputs[i].nbytes;
    }
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    int budget = c->timeout_ms;
    int wait = budget > INT32_MAX - OI_DIRECT_REPLY_GRACE_MS ? INT32_MAX : budget + OI_REPLY_GRACE_MS;
    out->id = id;
    rc = OI_DIRECT_USE_FRONT_DOOR;
    if (direct_path(c)) {
        oi_direct_request req = {model, version, id, frames, n_inputs + 1, tensor_bytes, budget, now_ms() + (int64_t)budget + OI_DIRECT_REPLY_GRACE_MS};
        oi_direct_answer answer;
        rc = oi_direct_infer(c->direct, &req, &answer, &u, err);
        if (rc != OI_DIRECT_USE_FRONT_DOOR) out->direct = answer.from_worker;
        if (rc == OI_OK) {
            if (answer.from_worker) out->client_us = (double)(now_us() - answer.sent_us);
            rc = read_infer_reply(&u.data, answer.frames, answer.n_frames, out);
        }
    }
    if (rc == OI_DIRECT_USE_FRONT_DOOR) rc = check_door_limit(c, tensor_bytes, err);
    if (rc == OI_DIRECT_USE_FRONT_DOOR) {
        msgvec v = {0};
        rc = exchange(c, id, frames, n_inputs + 1, budget, wait, OI_MAX_REPLY_HEADER_BYTES, &v, &u, err, &out->client_us);
        if (rc == OI_OK) {
            oi_frame few[8] = {{0}}, *view = v.n <= 8 ? few : malloc(v.n * sizeof *view);
            if (!view) rc = E_NOMEM(err);
            for (size_t i = 0; view && i < v.n; i++) {
                view[i].data = zmq_msg_data(&v.msgs[i]);
                view[i].size = zmq_msg_size(&v.msgs[i]);
            }
            if (view) rc = read_infer_reply(&u.data, view, v.n, out);
            if (view != few) free(view);
        }
        msgvec_free(&v);
    }
    free(frames);
    msgpack_sbuffer_destroy(&sb);
    if (!isnan(out->client_us) && !isnan(out->total_us)) out->transport_us = out->client_us - out->total_us;
    msgpack_unpacked_destroy(&u);
    return rc;
}

/* ---- other operations, raw frames -------------------------------------------------------------- */

static void reply_init(oi_reply *r) { memset(r, 0, sizeof *r); }

void oi_reply_free(oi_reply *r) {
    if (!r) return;
    for (size_t i = 0; i < r->n_frames; i++) free((void *)r->frames[i].data);
    free(r->frames);
    reply_init(r);
}

/* Move a received message into `out` (copies) and decode the envelope fields. */
static int fill_reply(msgvec *v, oi_reply *out) {
    out->frames = calloc(v->n ? v->n : 1, sizeof *out->frames);
    if (!out->frames) return E_NOMEM(&out->error);
    for (size_t i = 0; i < v->n; i++) {
        size_t size = zmq_msg_size(&v->msgs[i]);
        void *copy = malloc(size ? size : 1);
        if (!copy) return E_NOMEM(&out->error);
        if (size) memcpy(copy, zmq_msg_data(&v->msgs[i]), size);
        out->frames[i].data = copy;
        out->frames[i].size = size;
        out->n_frames = i + 1;
    }
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    if (out->n_frames && oi_unpack_one(&u, out->frames[0].data, out->frames[0].size) && u.data.type == MSGPACK_OBJECT_MAP) {
        uint64_t ver;
        out->header_ok = obj_uint(oi_map_get(&u.data, "v"), &ver) && ver == 1;
        out->has_id = header_id(&u.data, &out->id);
        const msgpack_object *e = oi_map_get(&u.data, "error");
        if (e && e->type != MSGPACK_OBJECT_NIL) {
            out->is_error = 1;
            read_error(e, &out->error, NULL);
        }
    }
    msgpack_unpacked_destroy(&u);
    return OI_OK;
}

int oi_request(oi_client *c, const char *op, const char *model, oi_reply *out) {
    if (!out) return OI_ERR_INVALID_ARGUMENT;
    reply_init(out);
    if (!c) return E_INVALID(&out->error, "client is NULL");
    int rc = check_text("op", op, &out->error);
    if (rc == OI_OK && model) rc = check_text("model", model, &out->error);
    if (rc != OI_OK) return rc;
    if (strcmp(op, "infer") == 0) return E_INVALID(&out->error, "use oi_infer for infer");
    uint64_t id = new_id(c);
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, model ? 4 : 3);
    pack_str(&pk, "v");
    msgpack_pack_uint64(&pk, 1);
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, id);
    pack_str(&pk, "op");
    pack_str(&pk, op);
    if (model) {
        pack_str(&pk, "model");
        pack_str(&pk, model);
    }
    if (!sb.data || sb.size > OI_MAX_HEADER_BYTES) {
        msgpack_sbuffer_destroy(&sb);
        return LOCAL_ERR(&out->error, OI_ERR_RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", "request header too large");
    }
    oi_frame frame = {sb.data, sb.size};
    msgvec v = {0};
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    rc = exchange(c, id, &frame, 1, c->timeout_ms, c->timeout_ms, OI_MAX_OP_REPLY_HEADER_BYTES, &v, &u, &out->error, NULL);
    msgpack_sbuffer_destroy(&sb);
    msgpack_unpacked_destroy(&u);
    if (rc == OI_OK) {
        rc = fill_reply(&v, out);
        if (rc == OI_OK && !out->header_ok) rc = E_PROTOCOL(&out->error, "reply header has no v = 1");
        else if (rc == OI_OK && out->is_error) rc = oi_code_to_rc(out->error.code);
    }
    msgvec_free(&v);
    return rc;
}

int oi_request_raw(oi_client *c, const oi_frame *frames, size_t n_frames, oi_reply *out) {
    if (!out) return OI_ERR_INVALID_ARGUMENT;
    reply_init(out);
    if (!c || !frames || n_frames == 0) return E_INVALID(&out->error, "no frames to send");
    for (size_t i = 0; i < n_frames; i++)
        if (frames[i].size && !frames[i].data) return E_INVALID(&out->error, "frame %zu has no data", i);
    int64_t start = now_ms();
    drain(c, start + c->timeout_ms);
    read_monitor(c);
    uint64_t since = c->disconnects;
    int rc = send_frames(c, frames, n_frames, start + c->timeout_ms, &out->error, NULL);
    if (rc != OI_OK) return rc;
    msgvec v = {0};
    rc = wait_message(c, &v, start + c->timeout_ms, since, &out->error);
    if (rc == OI_ERR_TIMEOUT) return E_TIMEOUT(&out->error, "no reply from %s within %d ms", c->address, c->timeout_ms);
    if (rc == OI_DISCONNECTED)
        return E_TRANSPORT(&out->error, "the connection to the daemon at %s closed while this request was in flight (a reply frame over this client's max_reply_bytes, %llu bytes, closes it too)",
                           c->address, (unsigned long long)c->max_reply_bytes);
    if (rc == OI_OK && v.n > 0) rc = check_header_size(zmq_msg_size(&v.msgs[0]), OI_MAX_OP_REPLY_HEADER_BYTES, c->address, &out->error);
    if (rc == OI_OK) rc = fill_reply(&v, out);
    msgvec_free(&v);
    return rc;
}

char *oi_reply_json(const oi_reply *r) {
    if (!r || r->n_frames == 0) return NULL;
    msgpack_unpacked u;
    char *json = NULL;
    msgpack_unpacked_init(&u);
    if (oi_unpack_one(&u, r->frames[0].data, r->frames[0].size)) json = json_of(&u.data);
    msgpack_unpacked_destroy(&u);
    return json;
}
