/* cwire: a closed-loop load generator speaking the OpenInfer wire protocol (docs/PROTOCOL.md) in C.
 *
 * Why C: the Python generators cost 20-200 us of CPU per request on the same 2 cores as the daemon,
 * so they measure themselves as much as the daemon. This one costs ~5 us.
 *
 * Driven over stdin/stdout by bench/cwireload.py, one command per line:
 *   prepare ADDRESS                                   connect (once per address), 50 warm-up requests
 *   run ADDRESS INFLIGHT START_NS MEASURE_NS END_NS FILE
 *       INFLIGHT requests outstanding on one DEALER socket, each reply starts the next, from START_NS
 *       (CLOCK_MONOTONIC, the clock of Python's time.monotonic_ns) until END_NS; requests sent at or
 *       after MEASURE_NS and answered by END_NS are recorded into FILE (binary, see write_results)
 *   quit
 * Each command is answered by one line: "ok" or "error <text>".
 * The request: {"v":1,"id":N,"op":"infer","model":MODEL,"inputs":[{"name":INPUT,"datatype":"FP32",
 * "shape":[ROWS,COLS]}]} + one frame of ROWS*COLS float32 ones.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <msgpack.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define MAX_SOCKETS 8
#define MAX_STAGES 24
#define MAX_CODES 16
#define MAX_INFLIGHT 4096

typedef struct {
    char name[32];
    double *values;
    size_t count, capacity;
} series;

typedef struct {
    char address[512];
    void *socket;
} connection;

static const char *model, *input;
static long rows, cols;
static void *context;
static connection connections[MAX_SOCKETS];
static size_t n_connections;
static float *payload;
static size_t payload_bytes;
static uint64_t next_id = 1;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

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

/* Sends one request; returns its id, 0 on failure. */
static uint64_t send_request(void *socket) {
    msgpack_sbuffer buffer;
    msgpack_packer p;
    msgpack_sbuffer_init(&buffer);
    msgpack_packer_init(&p, &buffer, msgpack_sbuffer_write);
    uint64_t id = next_id++;
    msgpack_pack_map(&p, 5);
    pack_str(&p, "v");
    msgpack_pack_int(&p, 1);
    pack_str(&p, "id");
    msgpack_pack_uint64(&p, id);
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
    int ok = zmq_send(socket, buffer.data, buffer.size, ZMQ_SNDMORE) >= 0 && zmq_send(socket, payload, payload_bytes, 0) >= 0;
    msgpack_sbuffer_destroy(&buffer);
    return ok ? id : 0;
}

typedef struct {
    uint64_t id;
    int has_error;
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

/* Receives one whole reply (header + any output frames); parses the header. 0 on success. */
static int receive_reply(void *socket, reply *out) {
    zmq_msg_t frame;
    zmq_msg_init(&frame);
    if (zmq_msg_recv(&frame, socket, 0) < 0) {
        zmq_msg_close(&frame);
        return -1;
    }
    memset(out, 0, sizeof *out);
    msgpack_unpacked unpacked;
    msgpack_unpacked_init(&unpacked);
    int rc = -1;
    if (msgpack_unpack_next(&unpacked, zmq_msg_data(&frame), zmq_msg_size(&frame), NULL) == MSGPACK_UNPACK_SUCCESS && unpacked.data.type == MSGPACK_OBJECT_MAP) {
        rc = 0;
        const msgpack_object_map *map = &unpacked.data.via.map;
        for (uint32_t i = 0; i < map->size; i++) {
            const msgpack_object *key = &map->ptr[i].key, *value = &map->ptr[i].val;
            if (key_is(key, "id") && value->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
                out->id = value->via.u64;
            } else if (key_is(key, "error") && value->type == MSGPACK_OBJECT_MAP) {
                out->has_error = 1;
                snprintf(out->code, sizeof out->code, "UNKNOWN");
                for (uint32_t j = 0; j < value->via.map.size; j++) {
                    const msgpack_object *k = &value->via.map.ptr[j].key, *v = &value->via.map.ptr[j].val;
                    if (key_is(k, "code") && v->type == MSGPACK_OBJECT_STR) {
                        snprintf(out->code, sizeof out->code, "%.*s", (int)v->via.str.size, v->via.str.ptr);
                    }
                }
            } else if (key_is(key, "timing") && value->type == MSGPACK_OBJECT_MAP) {
                for (uint32_t j = 0; j < value->via.map.size && out->n_timing < MAX_STAGES; j++) {
                    const msgpack_object *k = &value->via.map.ptr[j].key;
                    if (k->type != MSGPACK_OBJECT_STR || k->via.str.size >= 32) continue;
                    snprintf(out->timing_keys[out->n_timing], 32, "%.*s", (int)k->via.str.size, k->via.str.ptr);
                    out->timing_values[out->n_timing++] = number(&value->via.map.ptr[j].val);
                }
            }
        }
    }
    msgpack_unpacked_destroy(&unpacked);
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

static void *socket_for(const char *address, int *created) {
    for (size_t i = 0; i < n_connections; i++)
        if (strcmp(connections[i].address, address) == 0) return connections[i].socket;
    if (n_connections == MAX_SOCKETS) return NULL;
    void *socket = zmq_socket(context, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(socket, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(socket, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(socket, ZMQ_RCVHWM, &zero, sizeof zero);
    if (zmq_connect(socket, address) != 0) {
        zmq_close(socket);
        return NULL;
    }
    snprintf(connections[n_connections].address, sizeof connections[n_connections].address, "%s", address);
    connections[n_connections++].socket = socket;
    *created = 1;
    return socket;
}

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

/* FILE layout (little-endian, native): u64 n_latencies, i64 latencies[n]; u32 n_stages, then per stage
 * u32 name_len, name bytes, u64 n, f64 values[n]; u32 n_codes, then per code u32 len, bytes, u64 count. */
static int write_results(const results *r, const char *path) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    uint64_t n = r->n_latencies;
    fwrite(&n, sizeof n, 1, f);
    fwrite(r->latencies, sizeof(int64_t), r->n_latencies, f);
    uint32_t count = (uint32_t)r->n_stages;
    fwrite(&count, sizeof count, 1, f);
    for (size_t i = 0; i < r->n_stages; i++) {
        uint32_t len = (uint32_t)strlen(r->stages[i].name);
        fwrite(&len, sizeof len, 1, f);
        fwrite(r->stages[i].name, 1, len, f);
        n = r->stages[i].count;
        fwrite(&n, sizeof n, 1, f);
        fwrite(r->stages[i].values, sizeof(double), r->stages[i].count, f);
    }
    count = (uint32_t)r->n_codes;
    fwrite(&count, sizeof count, 1, f);
    for (size_t i = 0; i < r->n_codes; i++) {
        uint32_t len = (uint32_t)strlen(r->codes[i]);
        fwrite(&len, sizeof len, 1, f);
        fwrite(r->codes[i], 1, len, f);
        fwrite(&r->code_counts[i], sizeof(uint64_t), 1, f);
    }
    return fclose(f);
}

static void free_results(results *r) {
    free(r->latencies);
    for (size_t i = 0; i < r->n_stages; i++) free(r->stages[i].values);
}

typedef struct {
    uint64_t id;
    int64_t sent_ns;
} outstanding;

static const char *closed_loop(void *socket, long inflight, int64_t start_ns, int64_t measure_ns, int64_t end_ns, const char *path) {
    static outstanding slots[MAX_INFLIGHT];
    if (inflight < 1 || inflight > MAX_INFLIGHT) return "inflight out of range";
    while (now_ns() < start_ns) {
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
    for (long i = 0; i < inflight; i++) {
        slots[i].sent_ns = now_ns();
        if (!(slots[i].id = send_request(socket))) return "send failed";
    }
    results r;
    memset(&r, 0, sizeof r);
    long open = inflight;
    reply answer;
    while (open > 0) {
        if (receive_reply(socket, &answer) != 0) {
            free_results(&r);
            return "receive failed or reply header not a msgpack map";
        }
        int64_t t1 = now_ns();
        if (answer.id == 0) continue; /* ids start at 1; a reply without one is not to a request of ours */
        long slot = 0;
        while (slot < inflight && slots[slot].id != answer.id) slot++;
        if (slot == inflight) continue; /* not ours (a warm-up leftover) */
        int64_t t0 = slots[slot].sent_ns;
        if (t0 >= measure_ns && t1 <= end_ns) {
            if (answer.has_error) {
                record_error(&r, answer.code);
            } else {
                if (r.n_latencies == r.cap_latencies) r.latencies = grow(r.latencies, &r.cap_latencies, sizeof(int64_t));
                r.latencies[r.n_latencies++] = t1 - t0;
                for (size_t i = 0; i < answer.n_timing; i++) record_stage(&r, answer.timing_keys[i], answer.timing_values[i]);
            }
        }
        if (t1 < end_ns) {
            slots[slot].sent_ns = now_ns();
            if (!(slots[slot].id = send_request(socket))) {
                free_results(&r);
                return "send failed";
            }
        } else {
            slots[slot].id = 0;
            open--;
        }
    }
    int failed = write_results(&r, path) != 0;
    free_results(&r);
    return failed ? "cannot write the results file" : NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: cwire MODEL INPUT ROWS COLS  (then commands on stdin; see the top of cwire.c)\n");
        return 2;
    }
    model = argv[1];
    input = argv[2];
    rows = atol(argv[3]);
    cols = atol(argv[4]);
    if (rows < 1 || cols < 1) {
        fprintf(stderr, "cwire: ROWS and COLS must be positive\n");
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
        int created = 0;
        if (strncmp(line, "quit", 4) == 0) break;
        if (sscanf(line, "prepare %511s", address) == 1) {
            void *socket = socket_for(address, &created);
            if (!socket) {
                error = "cannot connect";
            } else if (created) {
                reply answer;
                for (int i = 0; i < 50 && !error; i++)
                    if (!send_request(socket) || receive_reply(socket, &answer) != 0) error = "warm-up request failed";
            }
        } else if (sscanf(line, "run %511s %ld %lld %lld %lld %1023s", address, &inflight, &start_ns, &measure_ns, &end_ns, path) == 6) {
            void *socket = socket_for(address, &created);
            error = socket ? closed_loop(socket, inflight, start_ns, measure_ns, end_ns, path) : "cannot connect";
        } else {
            error = "unknown command";
        }
        if (error) printf("error %s (%s)\n", error, zmq_strerror(errno));
        else printf("ok\n");
        fflush(stdout);
    }
    for (size_t i = 0; i < n_connections; i++) zmq_close(connections[i].socket);
    zmq_ctx_term(context);
    free(payload);
    return 0;
}
