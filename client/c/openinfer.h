/*
 * openinfer.h - a small C client for the OpenInfer daemon (wire protocol v1, docs/PROTOCOL.md).
 *
 * Written from docs/PROTOCOL.md alone. One oi_client owns one ZeroMQ context and one DEALER socket
 * (ZMQ_LINGER 0, ZMQ_IMMEDIATE 1, HWMs 1000, no routing id) to the daemon's socket, the *front door*.
 * Calls are synchronous: one request is in flight per call; replies that do not carry the id the call
 * waits for (late replies of requests that timed out, answers to the cancels this library sends) are
 * read and discarded. If the front door connection drops while a call waits for its reply (seen through
 * a libzmq socket monitor), the call fails at once with OI_ERR_TRANSPORT ("UNAVAILABLE") instead of
 * waiting out its timeout; libzmq reconnects by itself for the next call. A request with more than
 * 1 MiB of tensors is checked against the front door's limit first (`health` names it; asked once) and
 * refused here, OI_ERR_RESOURCE_EXHAUSTED (local = 1) naming server.max_request_bytes, when over it.
 *
 * The direct path (PROTOCOL.md 17). On ipc://, oi_infer sends the request straight to one of the
 * model's worker processes, one hop instead of two, under a lease the front door issues: leases are
 * kept per (model, version) and renewed before they expire; the library connects to the workers'
 * endpoints itself (ZMTP 3 over Unix sockets; no libzmq thread on this path), round robin. A daemon
 * without a direct path (pool.direct off, an older daemon, tcp://, CURVE) gets every request at the
 * front door: the client asks once and stops asking. Results are the same on both paths but for the
 * reply's `timing` (no dispatch_us / return_us on the direct path) and oi_result.direct.
 * What this library does on the direct path when things change:
 *   - the lease expired or a reload revoked it (PERMISSION_DENIED, details.lease "expired"): a new
 *     lease, and the request is sent again, once (the worker did not run it);
 *   - the worker retires (GOAWAY): its reply still comes; the next request takes a new lease; if it
 *     closes the connection with the request unanswered and its GOAWAY did not list it as read, it
 *     never read it: sent again on a new lease (once; a second time through the front door); if it
 *     listed it, OI_ERR_WORKER_CRASHED (it died while it could run it: never resent);
 *   - the worker dies with the request on it: OI_ERR_WORKER_CRASHED (local = 1), or
 *     OI_ERR_DEADLINE_EXCEEDED if the request's own deadline, or the model's max_compute_ms from when it
 *     was sent, had passed (the daemon kills a worker that overstays either); never resent (a poison
 *     input would kill the next worker too);
 *   - a request over the limits the lease reports (tensor bytes, header bytes, frames) is refused
 *     here: OI_ERR_RESOURCE_EXHAUSTED (local = 1) naming the limit.
 *
 * What this library bounds of what a daemon or a worker sends (a worker taken over, or whatever listens
 * at the address, must not take this process's memory or keep a call past its timeout):
 *   - a reply: at most max_reply_bytes (oi_set_max_reply_bytes; on the direct path also the lease's),
 *     and 65,536 frames on the direct path;
 *   - a reply's header (its first frame, the msgpack map): at most OI_MAX_REPLY_HEADER_BYTES for
 *     `infer` on both paths, OI_MAX_OP_REPLY_HEADER_BYTES for the other operations; over it the call
 *     fails OI_ERR_RESOURCE_EXHAUSTED naming the limit, the header never decoded (on the direct path
 *     never even stored: the worker's connection is closed as the frame's size arrives). A header whose
 *     arrays or maps claim more elements than it has bytes left is not decoded either (msgpack-c
 *     allocates for the claimed count up front: 6 bytes once asked for 128 GiB);
 *   - a worker's ZMTP commands: at most 64 KiB each (READY too), 64 at once and 100 a second after
 *     that; a PING is answered only while less than 64 KiB of PONGs wait unsent, and a PONG never
 *     waits. A worker past these breaks the protocol: OI_ERR_PROTOCOL, its connection closed;
 *   - time: every wait inside a call ends at the call's deadline (its timeout plus the grace below),
 *     whatever keeps arriving meanwhile.
 * Turn the direct path off with oi_set_direct(client, 0), or for every client of a process with the
 * environment variable OPENINFER_DIRECT=0 (read by oi_connect).
 *
 * An oi_client is not thread-safe: use one per thread (or lock around it).
 *
 * Tensor data is passed and returned exactly as on the wire: row-major, little-endian (PROTOCOL.md
 * section 6). This library does not byte-swap; on a big-endian host the caller must.
 */
#ifndef OPENINFER_H
#define OPENINFER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- return codes ---------------------------------------------------------------------------- */

/* 0 = success. Negative = failure; the oi_error of the call says more. */
enum {
    OI_OK = 0,
    /* The daemon answered with error.code (PROTOCOL.md 8.1), or this library found the same fault
     * in the request before sending it, or saw a worker's connection close with the request on it
     * (direct path: WORKER_CRASHED, DEADLINE_EXCEEDED) (oi_error.local = 1). */
    OI_ERR_INVALID_ARGUMENT = -1,
    OI_ERR_NOT_FOUND = -2,
    OI_ERR_RESOURCE_EXHAUSTED = -3,
    OI_ERR_DEADLINE_EXCEEDED = -4,
    OI_ERR_WORKER_CRASHED = -5,
    OI_ERR_UNAVAILABLE = -6,
    OI_ERR_PERMISSION_DENIED = -7,
    OI_ERR_INTERNAL = -8, /* also any error.code this library does not know; the string is kept */
    /* Local failures: the daemon did not answer. oi_error.local = 1. */
    OI_ERR_TIMEOUT = -100,   /* no reply within the client's timeout; error.code "DEADLINE_EXCEEDED" */
    OI_ERR_TRANSPORT = -101, /* cannot send: no daemon connected, or a ZeroMQ failure, or the connection
                                dropped while the call waited for its reply; "UNAVAILABLE" */
    OI_ERR_PROTOCOL = -102   /* the reply does not follow the protocol; error.code "INTERNAL" */
};

typedef struct oi_error {
    char code[32];     /* wire code ("NOT_FOUND", ...); "" on success */
    char message[512]; /* for humans (truncated at a UTF-8 character boundary) */
    int local;         /* 1 = made by this library (timeout, transport, bad call), 0 = from the daemon */
} oi_error;

/* "OK", "INVALID_ARGUMENT", ..., "TIMEOUT", "TRANSPORT", "PROTOCOL"; "?" for anything else. */
const char *oi_rc_name(int rc);
/* Wire error code -> return code (an unknown code -> OI_ERR_INTERNAL). */
int oi_code_to_rc(const char *code);

/* ---- client ---------------------------------------------------------------------------------- */

typedef struct oi_client oi_client;

/*
 * Connect a DEALER socket to `address` (ipc://PATH or tcp://HOST:PORT). NULL or "" resolves the
 * address as PROTOCOL.md 2.2 says: $OPENINFER_SOCKET, else ipc://$XDG_RUNTIME_DIR/openinfer/openinfer.sock,
 * else ipc:///run/openinfer/openinfer.sock.
 * `timeout_ms` is the budget of every call (<= 0: 30,000). ZeroMQ connects in the background, so a
 * missing daemon is reported by the first call (OI_ERR_TRANSPORT), not here.
 * Returns NULL (errno set) only when the address is invalid or out of memory.
 */
oi_client *oi_connect(const char *address, int timeout_ms);

/*
 * Use CURVE (tcp://). Keys are Z85 text, 40 characters each. Call right after oi_connect, before
 * any request: the socket is re-created with the keys and connected again.
 * Returns OI_OK, or OI_ERR_INVALID_ARGUMENT (bad key, or libzmq without CURVE) / OI_ERR_TRANSPORT.
 */
int oi_set_curve(oi_client *client, const char *server_public_z85, const char *client_public_z85,
                 const char *client_secret_z85);

void oi_set_timeout(oi_client *client, int timeout_ms);

/* The largest reply this client takes, in bytes (default 1 GiB, the daemon's largest reply frame). At
 * the front door it is ZMQ_MAXMSGSIZE: a reply frame over it closes the connection as its length
 * arrives, before anything is allocated, and the call fails OI_ERR_TRANSPORT saying so; on the direct
 * path a worker's reply over it (or over the lease's max_reply_bytes, if smaller) fails
 * OI_ERR_RESOURCE_EXHAUSTED. The socket is re-created: call it right after oi_connect. Returns OI_OK,
 * OI_ERR_INVALID_ARGUMENT (0, or over 2^63 - 1), or OI_ERR_TRANSPORT. */
int oi_set_max_reply_bytes(oi_client *client, uint64_t max_reply_bytes);

/* 1 (the default on ipc://, unless OPENINFER_DIRECT=0): oi_infer uses the direct path when the daemon
 * grants a lease; 0: every request goes through the front door (open worker connections are closed).
 * Returns OI_OK (OI_ERR_INVALID_ARGUMENT for a NULL client). */
int oi_set_direct(oi_client *client, int enabled);
const char *oi_address(const oi_client *client);

/* Close the socket (unsent messages are discarded) and free the client. NULL is fine. */
void oi_close(oi_client *client);

/* ---- infer ----------------------------------------------------------------------------------- */

typedef struct oi_tensor {
    const char *name;     /* model input name (UTF-8) */
    const char *datatype; /* "FP32", "INT64", "BYTES", ... (PROTOCOL.md 6) */
    const int64_t *shape; /* `rank` dimensions; NULL allowed when rank == 0 (scalar) */
    size_t rank;
    const void *data; /* wire bytes: row-major, little-endian; BYTES: 4-byte LE length + bytes each */
    size_t nbytes;
} oi_tensor;

typedef struct oi_output {
    char *name;
    char *datatype;
    int64_t *shape;
    size_t rank;
    void *data; /* a malloc'd copy of the data frame (aligned for any type); NULL when nbytes == 0 */
    size_t nbytes;
} oi_output;

typedef struct oi_timing {
    char *name; /* "decode_us", "queue_us", ... every key of the reply's `timing` */
    double value;
} oi_timing;

typedef struct oi_result {
    uint64_t id;        /* the request's id */
    char *model;        /* the model that ran (NULL on failure) */
    int64_t version;    /* the version that ran; -1 on failure */
    int64_t batch_size; /* -1 when the reply has no batch_size */
    int cache;          /* models with [cache]: 1 = answered from the verdict cache (nothing ran), 0 = it ran; -1 otherwise */
    oi_output *outputs; /* n_outputs entries, in reply order */
    size_t n_outputs;
    oi_timing *timing; /* every key of `timing`, in reply order (also on error replies) */
    size_t n_timing;
    double queue_us, compute_us, total_us; /* copies of those keys; NAN when absent */
    double client_us;    /* measured here: request sent -> reply received (NAN if no reply) */
    double transport_us; /* client_us - total_us: both transport hops (PROTOCOL.md 5.3); NAN if unknown */
    oi_error error;      /* filled when the call fails */
    char *error_details; /* error.details as JSON text, or NULL */
    int direct;          /* 1: sent straight to a worker over the direct path (its reply, or the failure,
                            came from there); 0: the front door answered (or nothing was sent) */
} oi_result;

/*
 * Run `model` (version >= 0, or -1 for the newest ready version) on `inputs`. The request carries
 * timeout_ms = the client's timeout; the call waits that long plus OI_REPLY_GRACE_MS for the reply,
 * then sends a cancel, returns OI_ERR_TIMEOUT and discards the late reply whenever it comes. The lease
 * (direct path) is taken within the same budget.
 * `out` is always initialised (free it with oi_result_free, whatever the return code).
 */
/* 600: a request stuck behind a run its worker cannot stop is answered by the daemon 500 ms past its
 * deadline, saying so; a client that gave up first could only say "no reply". */
#define OI_REPLY_GRACE_MS 600
/* On the direct path at least this much: a worker whose run does not stop at its deadline is killed
 * half a second past it, and its closed connection then answers the request DEADLINE_EXCEEDED (the
 * daemon's word, not this library's). A request given up on closes its worker connection all the same:
 * the next request takes a new lease, which leaves out a worker running past a deadline. */
#define OI_DIRECT_REPLY_GRACE_MS 1500
/* The largest reply header (frame 0) taken for `infer` (both paths), and for any other operation
 * (oi_request, oi_request_raw, the direct path's `lease`): `stats` and `status` of a large daemon are
 * well under 1 MiB. The Python clients hold the same bounds. */
#define OI_MAX_REPLY_HEADER_BYTES ((uint64_t)1 << 20)
#define OI_MAX_OP_REPLY_HEADER_BYTES ((uint64_t)8 << 20)
int oi_infer(oi_client *client, const char *model, int64_t version, const oi_tensor *inputs, size_t n_inputs,
             oi_result *out);

/*
 * Send the data, get the answer: `model`'s one BYTES input of shape [] (a model whose steps take data
 * whole, e.g. magika: a file's content) set to `data` (`len` bytes), then as oi_infer. Read the answer
 * with oi_output_text (labels) or oi_result_output.
 */
int oi_infer_bytes(oi_client *client, const char *model, const char *input_name, const void *data, size_t len,
                   oi_result *out);

/* The output named `name`, or NULL. */
const oi_output *oi_result_output(const oi_result *result, const char *name);
/* The first element of a BYTES output (e.g. magika's `label`): a pointer into output->data and its
 * length in *len (not NUL-terminated), or NULL when `output` is NULL, not BYTES, or malformed. */
const char *oi_output_text(const oi_output *output, size_t *len);
/* Element `index` of a BYTES output of any shape (row-major; e.g. the OCR chain's `text`, one line per
 * element): as oi_output_text, or NULL when `index` is past the last element or the data is malformed. */
const char *oi_output_text_at(const oi_output *output, size_t index, size_t *len);
/* 1 and *value if `timing` has `name`, else 0. */
int oi_result_timing(const oi_result *result, const char *name, double *value);
void oi_result_free(oi_result *result);

/* Bytes per element of a datatype name; 0 for BYTES and unknown names. */
size_t oi_datatype_size(const char *datatype);

/* ---- other operations and raw frames --------------------------------------------------------- */

typedef struct oi_frame {
    const void *data;
    size_t size;
} oi_frame;

typedef struct oi_reply {
    size_t n_frames;
    oi_frame *frames; /* owned copies; frames[0] is the reply header (msgpack) */
    int header_ok;    /* 1 when frames[0] is exactly one msgpack map with v = 1 */
    int has_id;       /* 0 when `id` is nil, missing or not an unsigned integer */
    uint64_t id;
    int is_error;  /* the header has an `error` map */
    oi_error error; /* its code and message when is_error */
} oi_reply;

/*
 * A non-infer operation ("health", "models", "metadata", "status", "stats", "reload", ...): sends
 * {v, id, op[, model]} and waits for the reply with that id. Returns OI_OK when the reply has no
 * `error` (read its `result` with oi_reply_json), the error's return code otherwise, or a local one.
 * `out` is always initialised; free it with oi_reply_free.
 */
int oi_request(oi_client *client, const char *op, const char *model, oi_reply *out);

/*
 * Send `frames` exactly as given (one multipart message; frame 0 need not even be msgpack) and
 * return the first message that arrives afterwards, whatever its id (replies already waiting on the
 * socket are discarded first). For conformance testing: use a fresh client so that no late reply of
 * an earlier request can be taken for this one. Returns OI_OK when a reply arrived (whatever it
 * says: look at out->is_error), OI_ERR_TIMEOUT, OI_ERR_TRANSPORT or OI_ERR_INVALID_ARGUMENT.
 */
int oi_request_raw(oi_client *client, const oi_frame *frames, size_t n_frames, oi_reply *out);

/* The reply header as JSON text (malloc'd; free() it), or NULL if frame 0 is not msgpack.
 * Integers stay exact, floats use %.17g, bin values become hex strings. */
char *oi_reply_json(const oi_reply *reply);

void oi_reply_free(oi_reply *reply);

#ifdef __cplusplus
}
#endif

#endif /* OPENINFER_H */
