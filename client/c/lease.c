/*
 * lease.c - leases and the messages around them (docs/PROTOCOL.md 17). See lease.h.
 */
#define _POSIX_C_SOURCE 200809L

#include "lease.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int oi_obj_is_str(const msgpack_object *o, const char *s) {
    size_t n = strlen(s);
    return o && o->type == MSGPACK_OBJECT_STR && o->via.str.size == n && memcmp(o->via.str.ptr, s, n) == 0;
}

const msgpack_object *oi_map_get(const msgpack_object *map, const char *key) {
    if (!map || map->type != MSGPACK_OBJECT_MAP) return NULL;
    for (uint32_t i = 0; i < map->via.map.size; i++)
        if (oi_obj_is_str(&map->via.map.ptr[i].key, key)) return &map->via.map.ptr[i].val;
    return NULL;
}

static void pack_str(msgpack_packer *pk, const char *s) {
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

void oi_pack_lease_request(msgpack_packer *pk, uint64_t id, const char *model, int64_t version) {
    msgpack_pack_map(pk, version >= 0 ? 5 : 4);
    pack_str(pk, "v");
    msgpack_pack_uint64(pk, 1);
    pack_str(pk, "id");
    msgpack_pack_uint64(pk, id);
    pack_str(pk, "op");
    pack_str(pk, "lease");
    pack_str(pk, "model");
    pack_str(pk, model);
    if (version >= 0) {
        pack_str(pk, "version");
        msgpack_pack_int64(pk, version);
    }
}

void oi_pack_attach(msgpack_packer *pk, uint64_t id, const oi_lease *lease) {
    msgpack_pack_map(pk, 4);
    pack_str(pk, "v");
    msgpack_pack_uint64(pk, 1);
    pack_str(pk, "id");
    msgpack_pack_uint64(pk, id);
    pack_str(pk, "op");
    pack_str(pk, "attach");
    pack_str(pk, "lease");
    msgpack_pack_bin(pk, lease->token_size);
    msgpack_pack_bin_body(pk, lease->token, lease->token_size);
}

static int get_uint(const msgpack_object *map, const char *key, uint64_t *out) {
    const msgpack_object *o = oi_map_get(map, key);
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER) return 0;
    *out = o->via.u64;
    return 1;
}

static char *dup_str(const msgpack_object *o) {
    char *s = malloc(o->via.str.size + 1);
    if (!s) return NULL;
    memcpy(s, o->via.str.ptr, o->via.str.size);
    s[o->via.str.size] = '\0';
    return s;
}

int oi_lease_parse(const msgpack_object *result, int64_t asked_ns, oi_lease *out) {
    memset(out, 0, sizeof *out);
    const msgpack_object *model = oi_map_get(result, "model"), *token = oi_map_get(result, "lease");
    const msgpack_object *workers = oi_map_get(result, "workers"), *limits = oi_map_get(result, "limits");
    uint64_t version, ttl_ms;
    if (!model || model->type != MSGPACK_OBJECT_STR || !token || token->type != MSGPACK_OBJECT_BIN ||
        token->via.bin.size == 0 || token->via.bin.size > 1024 || !workers || workers->type != MSGPACK_OBJECT_ARRAY ||
        workers->via.array.size == 0 || !get_uint(result, "version", &version) || version > INT64_MAX ||
        !get_uint(result, "expires_in_ms", &ttl_ms) || ttl_ms > 86400000 || !limits || limits->type != MSGPACK_OBJECT_MAP ||
        !get_uint(limits, "max_request_bytes", &out->max_request_bytes))
        return -1;
    if (!get_uint(limits, "max_header_bytes", &out->max_header_bytes)) out->max_header_bytes = 65536;
    if (!get_uint(limits, "max_frames", &out->max_frames)) out->max_frames = 257;
    if (!get_uint(limits, "max_reply_bytes", &out->max_reply_bytes) || out->max_reply_bytes == 0) out->max_reply_bytes = OI_DEFAULT_MAX_REPLY_BYTES;
    if (!get_uint(limits, "max_compute_ms", &out->max_compute_ms) || out->max_compute_ms > 86400000) out->max_compute_ms = 0;
    out->version = (int64_t)version;
    out->expires_ns = asked_ns + (int64_t)ttl_ms * 1000000;
    int64_t margin = (int64_t)ttl_ms * 1000000 / 2;
    out->renew_ns = out->expires_ns - (margin < OI_LEASE_RENEW_BEFORE_NS ? margin : OI_LEASE_RENEW_BEFORE_NS);
    if (!(out->model = dup_str(model)) || !(out->token = malloc(token->via.bin.size)) ||
        !(out->addresses = calloc(workers->via.array.size, sizeof *out->addresses)))
        goto nomem;
    memcpy(out->token, token->via.bin.ptr, token->via.bin.size);
    out->token_size = token->via.bin.size;
    for (uint32_t i = 0; i < workers->via.array.size; i++) {
        const msgpack_object *address = oi_map_get(&workers->via.array.ptr[i], "address");
        if (!address || address->type != MSGPACK_OBJECT_STR || address->via.str.size < 7 ||
            memcmp(address->via.str.ptr, "ipc://", 6) != 0 || memchr(address->via.str.ptr, 0, address->via.str.size)) {
            oi_lease_free(out);
            return -1;
        }
        if (!(out->addresses[out->n_addresses] = dup_str(address))) goto nomem;
        out->n_addresses++;
    }
    return 0;
nomem:
    oi_lease_free(out);
    return -2;
}

void oi_lease_free(oi_lease *lease) {
    if (!lease) return;
    for (size_t i = 0; i < lease->n_addresses; i++) free(lease->addresses[i]);
    free(lease->addresses);
    free(lease->token);
    free(lease->model);
    memset(lease, 0, sizeof *lease);
}

int oi_lease_names(const oi_lease *lease, const char *address) {
    for (size_t i = 0; i < lease->n_addresses; i++)
        if (strcmp(lease->addresses[i], address) == 0) return 1;
    return 0;
}

int oi_lease_refusal(const msgpack_object *error) {
    const msgpack_object *code = oi_map_get(error, "code");
    if (oi_obj_is_str(code, "INVALID_ARGUMENT")) return OI_LEASE_REFUSED_EVER; /* we sent a well-formed lease */
    if (oi_obj_is_str(code, "UNAVAILABLE"))
        return oi_obj_is_str(oi_map_get(oi_map_get(error, "details"), "direct"), "off") ? OI_LEASE_REFUSED_EVER
                                                                                       : OI_LEASE_REFUSED_NOW;
    return OI_LEASE_REFUSED_REPORT;
}

int oi_reply_lease_expired(const msgpack_object *header) {
    const msgpack_object *error = oi_map_get(header, "error");
    return oi_obj_is_str(oi_map_get(error, "code"), "PERMISSION_DENIED") &&
           oi_obj_is_str(oi_map_get(oi_map_get(error, "details"), "lease"), "expired");
}

int oi_reply_is_goaway(const msgpack_object *header) {
    const msgpack_object *goaway = oi_map_get(header, "goaway"), *id = oi_map_get(header, "id");
    return goaway && goaway->type == MSGPACK_OBJECT_BOOLEAN && goaway->via.boolean && (!id || id->type == MSGPACK_OBJECT_NIL);
}

int oi_goaway_lists(const msgpack_object *header, uint64_t id) {
    const msgpack_object *read = oi_map_get(header, "read");
    if (!read || read->type != MSGPACK_OBJECT_ARRAY) return 0;
    for (uint32_t i = 0; i < read->via.array.size; i++) {
        const msgpack_object *o = &read->via.array.ptr[i];
        if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 == id) return 1;
    }
    return 0;
}

int oi_lease_check_size(const oi_lease *lease, size_t header_bytes, size_t n_frames, uint64_t tensor_bytes, char *why,
                        size_t why_size) {
    if (header_bytes > lease->max_header_bytes)
        snprintf(why, why_size, "request header is %zu bytes; the daemon's limit (max_header_bytes) is %" PRIu64, header_bytes,
                 lease->max_header_bytes);
    else if (n_frames > lease->max_frames)
        snprintf(why, why_size, "request has %zu frames; the daemon's limit (max_frames) is %" PRIu64, n_frames, lease->max_frames);
    else if (tensor_bytes > lease->max_request_bytes)
        snprintf(why, why_size,
                 "request carries %" PRIu64 " bytes of tensors; the daemon's limit for '%s' (max_request_bytes: "
                 "server.max_request_bytes, or the model's) is %" PRIu64,
                 tensor_bytes, lease->model, lease->max_request_bytes);
    else
        return 0;
    return -1;
}
