/*
 * openinfer-c-example - uses the C client (openinfer.h).
 *
 *   openinfer-c-example [options] ADDR MODEL
 *       Sends x FP32[1,64] = 0.01 * i (the input of the example model `tiny`) and prints every output
 *       (its first values; all of them with --all), the reply's timing and the path it took
 *       ("path direct": a worker answered over the direct path; "path front-door").
 *       With --quiet, one line for all rounds instead:
 *         rounds N ok N direct N errors CODE=COUNT,...   ("errors -" when none)
 *   openinfer-c-example [options] requests ADDR REQUESTS.json
 *       Runs each request of a JSON array, in order, on one client:
 *         {"model": str, "version": int (optional), "inputs": [{"name", "datatype", "shape": [int],
 *          "hex": the data frame as hex}]}
 *       and prints one line per request (tab-separated):
 *         request INDEX OK|CODE rc=NAME local=0|1 path=direct|front-door timing=KEY,... outputs=OUT;...
 *         details=JSON|- message
 *       where OUT is NAME:DATATYPE:DIM,DIM,...:HEX. Before each request it prints "sending INDEX".
 *   openinfer-c-example [options] conformance ADDR VECTORS.json
 *       Replays every vector of tests/conformance/vectors.json as raw frames, each on a fresh
 *       connection, and prints one line per vector (tab-separated):
 *         NAME  OK|ERROR_CODE|NO_REPLY:<rc>  id=ID|nil  frames=SIZE,SIZE,...  match|MISMATCH  HEADER-JSON
 *       ("match" compares the reply's id and error code/OK with the vector's expect), then a tiny
 *       inference to show the daemon still serves, and a summary line. Exit status 1 on any mismatch.
 *   openinfer-c-example [options] op ADDR OPERATION [MODEL]
 *       A non-infer operation (health, models, metadata, status, stats, ...) through oi_request;
 *       prints "OK<TAB>reply-header-JSON" or "error CODE rc=NAME local=0|1: message<TAB>JSON".
 *
 * Options: --timeout MS (default 10000; 20000 for conformance), --all (print every output value),
 *          --repeat N (run the inference N times on one client), --duration MS (repeat for at least
 *          this long), --stop-file PATH (repeat until PATH exists), --quiet (infer mode: the summary line
 *          only), --front-door (oi_set_direct(c, 0): every request through the daemon's socket;
 *          OPENINFER_DIRECT=0 does the same).
 * CURVE (tcp://): set OPENINFER_CURVE_SERVER_KEY, OPENINFER_CURVE_PUBLIC_KEY, OPENINFER_CURVE_SECRET_KEY
 * (Z85, 40 characters each).
 */
#define _POSIX_C_SOURCE 200809L

#include "openinfer.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- a minimal JSON reader (enough for vectors.json) -------------------------------------------- */

typedef enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ } jtype;

typedef struct jval {
    jtype type;
    char *text; /* J_STR: decoded bytes (NUL-terminated, `len` long); J_NUM: the number as written */
    size_t len;
    int boolean;
    struct jval *items; /* J_ARR, J_OBJ */
    char **keys;        /* J_OBJ */
    size_t count;
} jval;

typedef struct {
    const char *p, *end;
    int depth;
} jparser;

static void jfree(jval *v) {
    for (size_t i = 0; i < v->count; i++) {
        jfree(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->text);
    memset(v, 0, sizeof *v);
}

static void jskip_ws(jparser *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\n' || *j->p == '\r' || *j->p == '\t')) j->p++;
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int jhex4(jparser *j, unsigned *out) {
    if (j->end - j->p < 4) return 0;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval((unsigned char)j->p[i]);
        if (h < 0) return 0;
        v = v << 4 | (unsigned)h;
    }
    j->p += 4;
    *out = v;
    return 1;
}

static void put_utf8(char *buf, size_t *n, unsigned cp) {
    if (cp < 0x80) buf[(*n)++] = (char)cp;
    else if (cp < 0x800) { buf[(*n)++] = (char)(0xC0 | cp >> 6); buf[(*n)++] = (char)(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) {
        buf[(*n)++] = (char)(0xE0 | cp >> 12);
        buf[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        buf[(*n)++] = (char)(0x80 | (cp & 0x3F));
    } else {
        buf[(*n)++] = (char)(0xF0 | cp >> 18);
        buf[(*n)++] = (char)(0x80 | ((cp >> 12) & 0x3F));
        buf[(*n)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        buf[(*n)++] = (char)(0x80 | (cp & 0x3F));
    }
}

/* After the opening quote. Decoded text is never longer than the source. */
static int jstring(jparser *j, char **out, size_t *len) {
    const char *start = j->p;
    while (j->p < j->end && *j->p != '"') j->p += (*j->p == '\\' && j->p + 1 < j->end) ? 2 : 1;
    if (j->p >= j->end) return 0;
    const char *stop = j->p++;
    char *buf = malloc((size_t)(stop - start) + 1);
    if (!buf) return 0;
    size_t n = 0;
    jparser s = {start, stop, 0};
    while (s.p < s.end) {
        char c = *s.p++;
        if (c != '\\') { buf[n++] = c; continue; }
        c = *s.p++;
        switch (c) {
        case 'n': buf[n++] = '\n'; break;
        case 't': buf[n++] = '\t'; break;
        case 'r': buf[n++] = '\r'; break;
        case 'b': buf[n++] = '\b'; break;
        case 'f': buf[n++] = '\f'; break;
        case 'u': {
            unsigned cp, lo;
            if (!jhex4(&s, &cp)) goto bad;
            if (cp >= 0xD800 && cp <= 0xDBFF && s.end - s.p >= 6 && s.p[0] == '\\' && s.p[1] == 'u') {
                s.p += 2;
                if (!jhex4(&s, &lo) || lo < 0xDC00 || lo > 0xDFFF) goto bad;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            put_utf8(buf, &n, cp);
            break;
        }
        default: buf[n++] = c; break; /* \" \\ \/ */
        }
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return 1;
bad:
    free(buf);
    return 0;
}

static int jparse(jparser *j, jval *v);

static int jcontainer(jparser *j, jval *v, int object) {
    char close = object ? '}' : ']';
    size_t cap = 0;
    jskip_ws(j);
    if (j->p < j->end && *j->p == close) { j->p++; return 1; }
    for (;;) {
        if (v->count == cap) {
            cap = cap ? cap * 2 : 8;
            jval *items = realloc(v->items, cap * sizeof *items);
            if (!items) return 0;
            v->items = items;
            if (object) {
                char **keys = realloc(v->keys, cap * sizeof *keys);
                if (!keys) return 0;
                v->keys = keys;
            }
        }
        jval *item = &v->items[v->count];
        memset(item, 0, sizeof *item);
        if (object) {
            size_t klen;
            v->keys[v->count] = NULL;
            jskip_ws(j);
            if (j->p >= j->end || *j->p != '"') return 0;
            j->p++;
            v->count++; /* count now covers the key and the (empty) item for jfree */
            if (!jstring(j, &v->keys[v->count - 1], &klen)) return 0;
            jskip_ws(j);
            if (j->p >= j->end || *j->p != ':') return 0;
            j->p++;
        } else {
            v->count++;
        }
        if (!jparse(j, item)) return 0;
        jskip_ws(j);
        if (j->p < j->end && *j->p == ',') { j->p++; continue; }
        if (j->p < j->end && *j->p == close) { j->p++; return 1; }
        return 0;
    }
}

static int jparse(jparser *j, jval *v) {
    memset(v, 0, sizeof *v);
    if (++j->depth > 64) return 0;
    jskip_ws(j);
    if (j->p >= j->end) return 0;
    int ok = 0;
    char c = *j->p;
    if (c == '{' || c == '[') {
        j->p++;
        v->type = c == '{' ? J_OBJ : J_ARR;
        ok = jcontainer(j, v, c == '{');
    } else if (c == '"') {
        j->p++;
        v->type = J_STR;
        ok = jstring(j, &v->text, &v->len);
    } else if (strncmp(j->p, "null", 4) == 0 && j->end - j->p >= 4) { j->p += 4; v->type = J_NULL; ok = 1; }
    else if (strncmp(j->p, "true", 4) == 0 && j->end - j->p >= 4) { j->p += 4; v->type = J_BOOL; v->boolean = 1; ok = 1; }
    else if (strncmp(j->p, "false", 5) == 0 && j->end - j->p >= 5) { j->p += 5; v->type = J_BOOL; ok = 1; }
    else if (c == '-' || (c >= '0' && c <= '9')) {
        const char *start = j->p;
        while (j->p < j->end && strchr("+-0123456789.eE", *j->p)) j->p++;
        v->type = J_NUM;
        v->len = (size_t)(j->p - start);
        v->text = malloc(v->len + 1);
        if (v->text) { memcpy(v->text, start, v->len); v->text[v->len] = '\0'; ok = 1; }
    }
    j->depth--;
    return ok;
}

static const jval *jget(const jval *obj, const char *key) {
    if (!obj || obj->type != J_OBJ) return NULL;
    for (size_t i = 0; i < obj->count; i++)
        if (strcmp(obj->keys[i], key) == 0) return &obj->items[i];
    return NULL;
}

static char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n == cap) {
            char *bigger = realloc(buf, cap *= 2);
            if (!bigger) { free(buf); buf = NULL; break; }
            buf = bigger;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    fclose(f);
    *size = n;
    return buf;
}

/* ---- client setup ------------------------------------------------------------------------------ */

static int front_door_only;      /* --front-door */
static unsigned long long max_reply_bytes; /* --max-reply-bytes N (0: the library's default) */
static const char *stop_file;    /* --stop-file */

static oi_client *connect_client(const char *address, int timeout_ms) {
    oi_client *c = oi_connect(address, timeout_ms);
    if (!c) {
        perror("oi_connect");
        return NULL;
    }
    if (front_door_only) oi_set_direct(c, 0);
    if (max_reply_bytes && oi_set_max_reply_bytes(c, max_reply_bytes) != OI_OK) {
        fprintf(stderr, "--max-reply-bytes: must be a positive number of bytes\n");
        oi_close(c);
        return NULL;
    }
    const char *server = getenv("OPENINFER_CURVE_SERVER_KEY"), *pub = getenv("OPENINFER_CURVE_PUBLIC_KEY"),
               *sec = getenv("OPENINFER_CURVE_SECRET_KEY");
    if (server && *server) {
        int rc = oi_set_curve(c, server, pub, sec);
        if (rc != OI_OK) {
            fprintf(stderr, "oi_set_curve: %s (keys must be 40-character Z85)\n", oi_rc_name(rc));
            oi_close(c);
            return NULL;
        }
    }
    return c;
}

/* ---- infer mode -------------------------------------------------------------------------------- */

static void print_value(const oi_output *o, size_t i) {
    const unsigned char *p = (const unsigned char *)o->data + i * oi_datatype_size(o->datatype);
    if (strcmp(o->datatype, "FP32") == 0) { float f; memcpy(&f, p, 4); printf(" %.9g", (double)f); }
    else if (strcmp(o->datatype, "FP64") == 0) { double d; memcpy(&d, p, 8); printf(" %.17g", d); }
    else if (strcmp(o->datatype, "INT64") == 0) { int64_t x; memcpy(&x, p, 8); printf(" %" PRId64, x); }
    else if (strcmp(o->datatype, "INT32") == 0) { int32_t x; memcpy(&x, p, 4); printf(" %" PRId32, x); }
    else if (strcmp(o->datatype, "UINT8") == 0 || strcmp(o->datatype, "BOOL") == 0) printf(" %u", p[0]);
    else printf(" ?");
}

static int64_t monotonic_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* --quiet: error codes counted over all rounds */
typedef struct {
    char code[32];
    unsigned long count;
} code_count;

static void count_code(code_count *codes, size_t *n, size_t cap, const char *code) {
    for (size_t i = 0; i < *n; i++)
        if (strcmp(codes[i].code, code) == 0) { codes[i].count++; return; }
    if (*n < cap) {
        snprintf(codes[*n].code, sizeof codes[*n].code, "%s", code);
        codes[(*n)++].count = 1;
    }
}

static int run_infer(const char *address, const char *model, int timeout_ms, int all, int repeat, int duration_ms, int quiet) {
    enum { N = 64 };
    float x[N];
    for (int i = 0; i < N; i++) x[i] = (float)(0.01 * i); /* little-endian host assumed (x86, arm) */
    const int64_t shape[2] = {1, N};
    const oi_tensor input = {"x", "FP32", shape, 2, x, sizeof x};

    oi_client *c = connect_client(address, timeout_ms);
    if (!c) return 2;
    int status = 0;
    unsigned long rounds = 0, ok = 0, direct = 0;
    code_count codes[16];
    size_t n_codes = 0;
    int64_t until = monotonic_ms() + duration_ms;
    for (int round = 0; round < repeat || monotonic_ms() < until || (stop_file && access(stop_file, F_OK) != 0); round++) {
        oi_result r;
        int rc = oi_infer(c, model, -1, &input, 1, &r);
        rounds++;
        direct += r.direct;
        if (quiet) {
            if (rc == OI_OK) ok++;
            else {
                count_code(codes, &n_codes, sizeof codes / sizeof codes[0], r.error.code);
                status = 1;
            }
        } else if (rc != OI_OK) {
            printf("error %s rc=%s local=%d: %s\n", r.error.code, oi_rc_name(rc), r.error.local, r.error.message);
            if (r.error_details) printf("details %s\n", r.error_details);
            status = 1;
        } else {
            printf("model %s version %" PRId64 " id %" PRIu64 "\n", r.model, r.version, r.id);
            for (size_t k = 0; k < r.n_outputs; k++) {
                const oi_output *o = &r.outputs[k];
                printf("output %s %s [", o->name, o->datatype);
                size_t count = 1;
                for (size_t d = 0; d < o->rank; d++) {
                    printf("%s%" PRId64, d ? "," : "", o->shape[d]);
                    count *= (size_t)o->shape[d];
                }
                printf("]");
                size_t show = all ? count : (count < 8 ? count : 8);
                if (!oi_datatype_size(o->datatype)) show = 0;
                for (size_t i = 0; i < show; i++) print_value(o, i);
                printf("%s\n", show < count ? " ..." : "");
            }
            printf("timing");
            for (size_t k = 0; k < r.n_timing; k++) printf(" %s=%.3f", r.timing[k].name, r.timing[k].value);
            printf("\n");
            printf("summary queue_us=%.3f compute_us=%.3f total_us=%.3f client_us=%.3f transport_us=%.3f\n", r.queue_us,
                   r.compute_us, r.total_us, r.client_us, r.transport_us);
            printf("path %s\n", r.direct ? "direct" : "front-door");
        }
        oi_result_free(&r);
        if (!quiet) fflush(stdout);
    }
    if (quiet) {
        printf("rounds %lu ok %lu direct %lu errors ", rounds, ok, direct);
        for (size_t i = 0; i < n_codes; i++) printf("%s%s=%lu", i ? "," : "", codes[i].code, codes[i].count);
        printf("%s\n", n_codes ? "" : "-");
        fflush(stdout);
    }
    oi_close(c);
    return status;
}

/* ---- conformance mode -------------------------------------------------------------------------- */

static int hex_decode(const jval *h, unsigned char **out, size_t *size) {
    if (h->type != J_STR || h->len % 2) return 0;
    *size = h->len / 2;
    *out = malloc(*size ? *size : 1);
    if (!*out) return 0;
    for (size_t i = 0; i < *size; i++) {
        int hi = hexval((unsigned char)h->text[2 * i]), lo = hexval((unsigned char)h->text[2 * i + 1]);
        if (hi < 0 || lo < 0) { free(*out); return 0; }
        (*out)[i] = (unsigned char)(hi << 4 | lo);
    }
    return 1;
}

/* ---- requests mode ---------------------------------------------------------------------------------- */

static void print_hex(const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) printf("%02x", p[i]);
}

/* One request of the JSON array: its inputs decoded into `tensors` (data and shapes malloc'd). */
static int load_request(const jval *spec, oi_tensor *tensors, size_t cap, size_t *n) {
    const jval *inputs = jget(spec, "inputs");
    if (!inputs || inputs->type != J_ARR || inputs->count > cap) return 0;
    *n = 0;
    for (size_t i = 0; i < inputs->count; i++) {
        const jval *in = &inputs->items[i], *name = jget(in, "name"), *dt = jget(in, "datatype"), *shape = jget(in, "shape"),
                   *hex = jget(in, "hex");
        if (!name || name->type != J_STR || !dt || dt->type != J_STR || !shape || shape->type != J_ARR || !hex) return 0;
        oi_tensor *t = &tensors[(*n)++];
        memset(t, 0, sizeof *t);
        t->name = name->text;
        t->datatype = dt->text;
        t->rank = shape->count;
        int64_t *dims = calloc(shape->count ? shape->count : 1, sizeof *dims);
        if (!dims) return 0;
        for (size_t d = 0; d < shape->count; d++) dims[d] = strtoll(shape->items[d].text ? shape->items[d].text : "0", NULL, 10);
        t->shape = dims;
        unsigned char *data;
        if (!hex_decode(hex, &data, &t->nbytes)) return 0;
        t->data = data;
    }
    return 1;
}

static int run_requests(const char *address, const char *path, int timeout_ms) {
    size_t size;
    char *text = read_file(path, &size);
    if (!text) { perror(path); return 2; }
    jparser j = {text, text + size, 0};
    jval root;
    int parsed = jparse(&j, &root);
    free(text);
    if (!parsed || root.type != J_ARR) {
        fprintf(stderr, "%s: not a JSON array of requests\n", path);
        jfree(&root);
        return 2;
    }
    oi_client *c = connect_client(address, timeout_ms);
    if (!c) { jfree(&root); return 2; }
    int status = 0;
    for (size_t k = 0; k < root.count; k++) {
        const jval *spec = &root.items[k], *model = jget(spec, "model"), *version = jget(spec, "version");
        oi_tensor tensors[256];
        size_t n = 0;
        if (!model || model->type != J_STR || !load_request(spec, tensors, 256, &n)) {
            printf("request\t%zu\tBAD_REQUEST\n", k);
            status = 2;
        } else {
            printf("sending\t%zu\n", k);
            fflush(stdout);
            oi_result r;
            int64_t v = version && version->type == J_NUM ? strtoll(version->text, NULL, 10) : -1;
            int rc = oi_infer(c, model->text, v, tensors, n, &r);
            printf("request\t%zu\t%s\trc=%s\tlocal=%d\tpath=%s\ttiming=", k, rc == OI_OK ? "OK" : r.error.code, oi_rc_name(rc),
                   r.error.local, r.direct ? "direct" : "front-door");
            for (size_t i = 0; i < r.n_timing; i++) printf("%s%s", i ? "," : "", r.timing[i].name);
            printf("\toutputs=");
            for (size_t i = 0; i < r.n_outputs; i++) {
                const oi_output *o = &r.outputs[i];
                printf("%s%s:%s:", i ? ";" : "", o->name, o->datatype);
                for (size_t d = 0; d < o->rank; d++) printf("%s%" PRId64, d ? "," : "", o->shape[d]);
                printf(":");
                print_hex(o->data, o->nbytes);
            }
            printf("\tdetails=%s\t%s\n", r.error_details ? r.error_details : "-", r.error.message);
            if (rc != OI_OK) status = 1;
            oi_result_free(&r);
        }
        for (size_t i = 0; i < n; i++) {
            free((void *)tensors[i].shape);
            free((void *)tensors[i].data);
        }
        fflush(stdout);
    }
    oi_close(c);
    jfree(&root);
    return status;
}

/* Replay one vector; print its line; return 1 if the reply matches the expectation. */
static int replay(const char *address, int timeout_ms, const jval *vec) {
    const jval *name = jget(vec, "name"), *req = jget(vec, "request"), *expect = jget(vec, "expect");
    const jval *hexes = jget(req, "frames_hex");
    if (!name || name->type != J_STR || !hexes || hexes->type != J_ARR || !expect) {
        printf("?\tBAD_VECTOR\n");
        return 0;
    }
    oi_frame *frames = calloc(hexes->count ? hexes->count : 1, sizeof *frames);
    int ok = frames != NULL;
    for (size_t i = 0; ok && i < hexes->count; i++) {
        unsigned char *bytes;
        size_t size;
        ok = hex_decode(&hexes->items[i], &bytes, &size);
        if (ok) { frames[i].data = bytes; frames[i].size = size; }
    }
    int match = 0;
    if (!ok) printf("%s\tBAD_VECTOR\n", name->text);
    else {
        oi_client *c = connect_client(address, timeout_ms); /* fresh connection per vector (README) */
        oi_reply reply;
        int rc = c ? oi_request_raw(c, frames, hexes->count, &reply) : OI_ERR_TRANSPORT;
        if (!c) memset(&reply, 0, sizeof reply);
        char id[32] = "nil";
        if (reply.has_id) snprintf(id, sizeof id, "%" PRIu64, reply.id);
        if (rc != OI_OK) {
            printf("%s\tNO_REPLY:%s\tid=-\tframes=\tMISMATCH\t%s\n", name->text, oi_rc_name(rc), reply.error.message);
        } else {
            const jval *eid = jget(expect, "id"), *eerr = jget(expect, "error");
            int id_ok = eid && ((eid->type == J_NULL && !reply.has_id) || (eid->type == J_NUM && reply.has_id && strcmp(eid->text, id) == 0));
            int code_ok = eerr ? (reply.is_error && eerr->type == J_STR && strcmp(eerr->text, reply.error.code) == 0)
                               : !reply.is_error;
            match = reply.header_ok && id_ok && code_ok;
            char *json = oi_reply_json(&reply);
            printf("%s\t%s\tid=%s\tframes=", name->text, reply.is_error ? reply.error.code : "OK", id);
            for (size_t i = 0; i < reply.n_frames; i++) printf("%s%zu", i ? "," : "", reply.frames[i].size);
            printf("\t%s\t%s\n", match ? "match" : "MISMATCH", json ? json : "null");
            free(json);
        }
        oi_reply_free(&reply);
        oi_close(c);
    }
    for (size_t i = 0; frames && i < hexes->count; i++) free((void *)frames[i].data);
    free(frames);
    fflush(stdout);
    return match;
}

static int run_conformance(const char *address, const char *path, int timeout_ms) {
    size_t size;
    char *text = read_file(path, &size);
    if (!text) { perror(path); return 2; }
    jparser j = {text, text + size, 0};
    jval root;
    int parsed = jparse(&j, &root);
    free(text);
    if (!parsed || root.type != J_ARR) {
        fprintf(stderr, "%s: not a JSON array of vectors\n", path);
        jfree(&root);
        return 2;
    }
    size_t mismatches = 0;
    for (size_t i = 0; i < root.count; i++) mismatches += !replay(address, timeout_ms, &root.items[i]);

    /* afterwards the daemon must still answer a correct inference (README step 4) */
    float x[64] = {0};
    const int64_t shape[2] = {1, 64};
    const oi_tensor input = {"x", "FP32", shape, 2, x, sizeof x};
    oi_client *c = connect_client(address, timeout_ms);
    oi_result r;
    int rc = c ? oi_infer(c, "tiny", -1, &input, 1, &r) : OI_ERR_TRANSPORT;
    if (!c) memset(&r, 0, sizeof r);
    printf("after\t%s\n", rc == OI_OK ? "OK" : r.error.code);
    oi_result_free(&r);
    oi_close(c);
    printf("summary\t%zu vectors\t%zu mismatches\n", root.count, mismatches);
    jfree(&root);
    return mismatches || rc != OI_OK ? 1 : 0;
}

/* ---- op mode: a non-infer operation through oi_request ------------------------------------------ */

static int run_op(const char *address, const char *op, const char *model, int timeout_ms) {
    oi_client *c = connect_client(address, timeout_ms);
    if (!c) return 2;
    oi_reply reply;
    int rc = oi_request(c, op, model, &reply);
    char *json = oi_reply_json(&reply);
    if (rc == OI_OK) printf("OK\t%s\n", json ? json : "null");
    else printf("error %s rc=%s local=%d: %s\t%s\n", reply.error.code, oi_rc_name(rc), reply.error.local,
                reply.error.message, json ? json : "null");
    free(json);
    oi_reply_free(&reply);
    oi_close(c);
    return rc == OI_OK ? 0 : 1;
}

/* ---- verdict mode: a file's bytes in, the model's answer out (a model with steps, e.g. magika) ---- */

static int run_verdict(const char *address, const char *model, const char *path, const char *input, int timeout_ms) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return 2;
    }
    size_t cap = 1 << 16, len = 0;
    unsigned char *data = malloc(cap);
    for (size_t got; data && (got = fread(data + len, 1, cap - len, f)) > 0;) {
        len += got;
        if (len == cap) {
            unsigned char *bigger = realloc(data, cap *= 2);
            if (!bigger) free(data);
            data = bigger;
        }
    }
    fclose(f);
    if (!data) return 2;
    oi_client *c = connect_client(address, timeout_ms);
    if (!c) {
        free(data);
        return 2;
    }
    oi_result r;
    int rc = oi_infer_bytes(c, model, input, data, len, &r);
    free(data);
    if (rc == OI_OK) {
        printf("OK");
        for (size_t i = 0; i < r.n_outputs; i++) {
            size_t n = 0;
            const char *text = oi_output_text(&r.outputs[i], &n);
            if (text && r.outputs[i].rank > 0) {  /* several elements (e.g. OCR lines): each, quoted */
                printf("\t%s=[", r.outputs[i].name);
                for (size_t k = 0; (text = oi_output_text_at(&r.outputs[i], k, &n)) != NULL; k++)
                    printf("%s\"%.*s\"", k ? ", " : "", (int)n, text);
                printf("]");
            } else if (text) printf("\t%s=%.*s", r.outputs[i].name, (int)n, text);
            else if (strcmp(r.outputs[i].datatype, "FP32") == 0 && r.outputs[i].nbytes == 4) printf("\t%s=%.4f", r.outputs[i].name, (double)*(const float *)r.outputs[i].data);
        }
        printf("\tcache=%d\n", r.cache);
    } else {
        printf("error %s rc=%s: %s\n", r.error.code, oi_rc_name(rc), r.error.message);
    }
    oi_result_free(&r);
    oi_close(c);
    return rc == OI_OK ? 0 : 1;
}

static int usage(void) {
    fprintf(stderr, "usage: openinfer-c-example [--timeout MS] [--front-door] [--all] [--repeat N] [--duration MS] [--stop-file PATH] [--quiet] ADDR MODEL\n"
                    "       openinfer-c-example [--timeout MS] [--front-door] requests ADDR REQUESTS.json\n"
                    "       openinfer-c-example [--timeout MS] conformance ADDR VECTORS.json\n"
                    "       openinfer-c-example [--timeout MS] op ADDR OPERATION [MODEL]\n"
                    "       openinfer-c-example [--timeout MS] verdict ADDR MODEL FILE [INPUT]   (INPUT: the BYTES input, default bytes)\n"
                    "every form also takes --max-reply-bytes N (the largest reply taken; default 1 GiB)\n");
    return 2;
}

int main(int argc, char **argv) {
    int timeout_ms = 0, all = 0, repeat = 1, duration_ms = 0, quiet = 0, i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (strcmp(argv[i], "--all") == 0) all = 1;
        else if (strcmp(argv[i], "--quiet") == 0) quiet = 1;
        else if (strcmp(argv[i], "--front-door") == 0) front_door_only = 1;
        else if (strcmp(argv[i], "--max-reply-bytes") == 0 && i + 1 < argc) max_reply_bytes = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--timeout") == 0 && i + 1 < argc) timeout_ms = atoi(argv[++i]);
        else if (strcmp(argv[i], "--repeat") == 0 && i + 1 < argc) repeat = atoi(argv[++i]);
        else if (strcmp(argv[i], "--duration") == 0 && i + 1 < argc) duration_ms = atoi(argv[++i]);
        else if (strcmp(argv[i], "--stop-file") == 0 && i + 1 < argc) stop_file = argv[++i];
        else return usage();
    }
    if (argc - i == 3 && strcmp(argv[i], "requests") == 0)
        return run_requests(argv[i + 1], argv[i + 2], timeout_ms > 0 ? timeout_ms : 10000);
    if (argc - i == 3 && strcmp(argv[i], "conformance") == 0)
        return run_conformance(argv[i + 1], argv[i + 2], timeout_ms > 0 ? timeout_ms : 20000);
    if ((argc - i == 4 || argc - i == 5) && strcmp(argv[i], "verdict") == 0)
        return run_verdict(argv[i + 1], argv[i + 2], argv[i + 3], argc - i == 5 ? argv[i + 4] : "bytes", timeout_ms > 0 ? timeout_ms : 10000);
    if ((argc - i == 3 || argc - i == 4) && strcmp(argv[i], "op") == 0)
        return run_op(argv[i + 1], argv[i + 2], argc - i == 4 ? argv[i + 3] : NULL, timeout_ms > 0 ? timeout_ms : 10000);
    if (argc - i == 2 && repeat > 0)
        return run_infer(argv[i], argv[i + 1], timeout_ms > 0 ? timeout_ms : 10000, all, repeat, duration_ms, quiet);
    return usage();
}
