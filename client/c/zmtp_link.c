/*
 * zmtp_link.c - ZMTP 3.x, NULL mechanism, as a DEALER, over a Unix stream socket. See zmtp_link.h.
 */
#define _POSIX_C_SOURCE 200809L

#include "zmtp_link.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define F_MORE 0x01
#define F_LONG 0x02
#define F_COMMAND 0x04
#define GREETING_SIZE 64
#define READ_CHUNK (64 * 1024)
#define FILL_STEP ((size_t)1 << 20) /* what one oi_link_fill reads at most, past the message it waits for */
#define MAX_FRAME ((uint64_t)1 << 40) /* a size no worker sends: the stream is not ZMTP */
#define MAX_IOV 1024                 /* Linux's IOV_MAX; a request has at most 257 frames = 514 buffers, and the PONGs waiting */
#define PONG_MAX (2 + 5 + 16)        /* a PONG frame: its head, its name, a context of at most 16 bytes */

int64_t oi_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t oi_now_ms(void) { return oi_now_ns() / 1000000; }

static int poll_ms(int64_t deadline_ms) {
    int64_t left = deadline_ms - oi_now_ms();
    return left <= 0 ? 0 : left > 1000000000 ? 1000000000 : (int)left;
}

/* Our greeting (signature, version 3.1, mechanism NULL, as-server 0, filler) and READY. */
static size_t handshake_bytes(unsigned char *out) {
    memset(out, 0, GREETING_SIZE);
    out[0] = 0xFF;
    out[9] = 0x7F;
    out[10] = 3;
    out[11] = 1;
    memcpy(out + 12, "NULL", 4);
    static const char ready[] = "\x05READY\x0bSocket-Type\x00\x00\x00\x06" "DEALER";
    size_t body = sizeof ready - 1;
    out[GREETING_SIZE] = F_COMMAND;
    out[GREETING_SIZE + 1] = (unsigned char)body;
    memcpy(out + GREETING_SIZE + 2, ready, body);
    return GREETING_SIZE + 2 + body;
}

static size_t frame_header(unsigned char *out, size_t size, int more) {
    if (size < 256) {
        out[0] = more ? F_MORE : 0;
        out[1] = (unsigned char)size;
        return 2;
    }
    out[0] = (unsigned char)((more ? F_MORE : 0) | F_LONG);
    for (int i = 0; i < 8; i++) out[1 + i] = (unsigned char)((uint64_t)size >> (56 - 8 * i));
    return 9;
}

/* Write `iov` completely: sendmsg without blocking, poll while the socket is full. */
static int write_all(int fd, struct iovec *iov, size_t n, int64_t deadline_ms) {
    size_t i = 0;
    while (i < n) {
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov + i;
        msg.msg_iovlen = n - i;
        ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct pollfd p = {fd, POLLOUT, 0};
                int left = poll_ms(deadline_ms);
                if (left == 0) return OI_LINK_TIMEOUT;
                if (poll(&p, 1, left) < 0 && errno != EINTR) return OI_LINK_ERROR;
                continue;
            }
            return errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN ? OI_LINK_CLOSED : OI_LINK_ERROR;
        }
        size_t left = (size_t)sent;
        while (i < n && left >= iov[i].iov_len) left -= iov[i++].iov_len;
        if (i < n) {
            iov[i].iov_base = (char *)iov[i].iov_base + left;
            iov[i].iov_len -= left;
        }
    }
    return OI_LINK_OK;
}

/* One message: its frames' headers and bodies in one sendmsg (bodies are not copied), after the PONGs
 * that wait (a message must never cut into a PONG half sent). */
static int send_message(oi_link *link, const oi_frame *frames, size_t n, int64_t deadline_ms) {
    if (n == 0 || 2 * n + 1 > MAX_IOV) {
        errno = EINVAL;
        return OI_LINK_ERROR;
    }
    struct iovec iov[MAX_IOV];
    unsigned char heads[(MAX_IOV / 2) * 9];
    size_t k = 0;
    if (link->pongs_len) iov[k++] = (struct iovec){link->pongs, link->pongs_len};
    for (size_t i = 0; i < n; i++) {
        unsigned char *h = heads + 9 * i;
        iov[k++] = (struct iovec){h, frame_header(h, frames[i].size, i + 1 < n)};
        if (frames[i].size) iov[k++] = (struct iovec){(void *)frames[i].data, frames[i].size};
    }
    int rc = write_all(link->fd, iov, k, deadline_ms);
    if (rc == OI_LINK_OK) link->pongs_len = 0; /* (otherwise the link is closed: maybe half a message on it) */
    return rc;
}

oi_link *oi_link_connect(const char *address, const oi_frame *frames, size_t n_frames, int64_t deadline_ms, int *status) {
    *status = OI_LINK_ERROR;
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (strncmp(address, "ipc://", 6) != 0 || strlen(address + 6) >= sizeof sa.sun_path) {
        errno = EINVAL;
        return NULL;
    }
    strcpy(sa.sun_path, address + 6);
    oi_link *link = calloc(1, sizeof *link);
    if (!link) return NULL;
    link->fd = -1;
    link->command_tokens = OI_LINK_COMMAND_BURST;
    link->command_at_ns = oi_now_ns();
    if (!(link->address = strdup(address))) goto fail;
    link->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (link->fd < 0) goto fail;
    while (connect(link->fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        if (errno != EINTR) goto fail; /* a Unix socket connects at once, or EAGAIN when its backlog is full */
    /* Our greeting and READY, then the worker's. The first message waits for them: libzmq (4.3.5) drops
     * a peer whose first message arrives in the same read as its READY (ZMTP_UNEXPECTED_COMMAND). */
    unsigned char hello[GREETING_SIZE + 64];
    struct iovec iov = {hello, handshake_bytes(hello)};
    int rc = write_all(link->fd, &iov, 1, deadline_ms);
    while (rc == OI_LINK_OK && link->state != 2) {
        const oi_frame *unused;
        size_t n;
        /* the deadline holds even while bytes keep coming (a greeting or READY trickled a byte at a time) */
        if (oi_now_ms() >= deadline_ms || !oi_link_wait(link, deadline_ms)) rc = OI_LINK_TIMEOUT;
        else if ((rc = oi_link_fill(link)) == OI_LINK_OK && oi_link_next(link, &unused, &n) != 0) rc = OI_LINK_CLOSED;
    }
    if (rc == OI_LINK_OK && n_frames) rc = send_message(link, frames, n_frames, deadline_ms);
    if (rc != OI_LINK_OK) {
        *status = rc;
        goto fail;
    }
    *status = OI_LINK_OK;
    return link;
fail:;
    int saved = errno;
    oi_link_close(link);
    errno = saved;
    return NULL;
}

int oi_link_send(oi_link *link, const oi_frame *frames, size_t n_frames, int64_t deadline_ms) {
    return send_message(link, frames, n_frames, deadline_ms);
}

int oi_link_fill(oi_link *link) {
    if (link->start == link->len) link->start = link->len = 0;
    if (link->need > link->cap - link->start) { /* a large frame is on its way: room for all of it */
        if (link->start) {
            memmove(link->buf, link->buf + link->start, link->len - link->start);
            link->len -= link->start;
            link->start = 0;
        }
        unsigned char *bigger = realloc(link->buf, link->need + READ_CHUNK);
        if (!bigger) return OI_LINK_ERROR;
        link->buf = bigger;
        link->cap = link->need + READ_CHUNK;
    }
    /* Bounded work per call: the message waited for, or FILL_STEP, whichever is more. A worker that
     * writes as fast as this reads would otherwise keep the call here, the buffer growing. */
    size_t budget = link->need > FILL_STEP ? link->need : FILL_STEP, taken = 0;
    link->need = 0;
    for (;;) {
        if (link->cap - link->len < READ_CHUNK / 4) {
            if (link->start) { /* keep only what is not handed out yet */
                memmove(link->buf, link->buf + link->start, link->len - link->start);
                link->len -= link->start;
                link->start = 0;
            }
            if (link->cap - link->len < READ_CHUNK / 4) {
                size_t cap = link->cap ? link->cap * 2 : READ_CHUNK;
                unsigned char *bigger = realloc(link->buf, cap);
                if (!bigger) return OI_LINK_ERROR;
                link->buf = bigger;
                link->cap = cap;
            }
        }
        ssize_t got = recv(link->fd, link->buf + link->len, link->cap - link->len, MSG_DONTWAIT);
        if (got > 0) {
            link->len += (size_t)got;
            taken += (size_t)got;
            if (link->len < link->cap || taken >= budget) return OI_LINK_OK; /* the kernel had no more, or enough for now */
            continue;
        }
        if (got == 0) return OI_LINK_CLOSED;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return OI_LINK_OK;
        return OI_LINK_CLOSED; /* ECONNRESET and the like */
    }
}

/* Send what the socket takes of the PONGs waiting, now, without waiting: OI_LINK_OK or OI_LINK_CLOSED. */
static int flush_pongs(oi_link *link) {
    while (link->pongs_len) {
        ssize_t sent = send(link->fd, link->pongs, link->pongs_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EINTR) continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? OI_LINK_OK : OI_LINK_CLOSED;
        }
        link->pongs_len -= (size_t)sent;
        memmove(link->pongs, link->pongs + sent, link->pongs_len);
    }
    return OI_LINK_OK;
}

/* Queue a PONG echoing `context` and send what the socket takes: a PONG never blocks. None is made while
 * OI_LINK_PONG_BACKLOG_BYTES wait (a worker that pings without reading): that PING goes unanswered. */
static int pong(oi_link *link, const unsigned char *context, size_t size) {
    if (link->pongs_len >= OI_LINK_PONG_BACKLOG_BYTES) return OI_LINK_OK;
    if (!link->pongs && !(link->pongs = malloc(OI_LINK_PONG_BACKLOG_BYTES + PONG_MAX))) return OI_LINK_OK; /* unanswered */
    unsigned char *out = link->pongs + link->pongs_len;
    out[0] = F_COMMAND;
    out[1] = (unsigned char)(5 + size);
    out[2] = 4;
    memcpy(out + 3, "PONG", 4);
    memcpy(out + 7, context, size);
    link->pongs_len += 7 + size;
    return flush_pongs(link);
}

/* A command: PING is answered, ERROR ends the link, others are ignored. Each costs a token of the link's
 * bucket (OI_LINK_COMMAND_BURST, refilled OI_LINK_COMMANDS_PER_S): a worker past it is cut. */
static int on_command(oi_link *link, const unsigned char *body, size_t size) {
    int64_t now = oi_now_ns();
    double tokens = link->command_tokens + (double)(now - link->command_at_ns) * OI_LINK_COMMANDS_PER_S / 1e9;
    link->command_tokens = (tokens > OI_LINK_COMMAND_BURST ? OI_LINK_COMMAND_BURST : tokens) - 1;
    link->command_at_ns = now;
    if (link->command_tokens < 0) {
        snprintf(link->why, sizeof link->why, "more than %d commands at once, or %d a second", OI_LINK_COMMAND_BURST, OI_LINK_COMMANDS_PER_S);
        return OI_LINK_PROTOCOL;
    }
    if (size < 1 || (size_t)body[0] + 1 > size) return OI_LINK_CLOSED;
    size_t name_len = body[0];
    const unsigned char *name = body + 1, *data = body + 1 + name_len;
    size_t data_len = size - 1 - name_len;
    if (name_len == 5 && memcmp(name, "ERROR", 5) == 0) return OI_LINK_CLOSED;
    if (name_len == 4 && memcmp(name, "PING", 4) == 0 && data_len >= 2) /* TTL (2 bytes), then a context PONG echoes */
        return pong(link, data + 2, data_len - 2 < 16 ? data_len - 2 : 16);
    return OI_LINK_OK;
}

/* The worker's READY: must be a READY command naming a ROUTER (what every worker endpoint is). */
static int check_ready(const unsigned char *body, size_t size) {
    if (size < 6 || body[0] != 5 || memcmp(body + 1, "READY", 5) != 0) return 0;
    size_t pos = 6;
    while (pos < size) {
        size_t name_len = body[pos++];
        if (pos + name_len + 4 > size) return 0;
        const unsigned char *name = body + pos;
        pos += name_len;
        uint32_t value_len = (uint32_t)body[pos] << 24 | (uint32_t)body[pos + 1] << 16 | (uint32_t)body[pos + 2] << 8 | body[pos + 3];
        pos += 4;
        if (value_len > size - pos) return 0;
        if (name_len == 11 && strncasecmp((const char *)name, "Socket-Type", 11) == 0)
            return value_len == 6 && memcmp(body + pos, "ROUTER", 6) == 0;
        pos += value_len;
    }
    return 0;
}

static int oversized(oi_link *link, int over, uint64_t size) {
    link->over = over;
    link->over_size = size;
    return OI_LINK_OVERSIZED;
}

int oi_link_next(oi_link *link, const oi_frame **frames_out, size_t *n_out) {
    const unsigned char *buf = link->buf;
    size_t pos = link->start, end = link->len, n = 0;
    uint64_t max_message = link->max_message ? link->max_message : ((uint64_t)1 << 30), message = 0;
    uint64_t max_first = link->max_first_frame ? link->max_first_frame : OI_MAX_REPLY_HEADER_BYTES;
    if (link->state == 0) {
        if (end - pos < GREETING_SIZE) return 0;
        if (buf[pos] != 0xFF || buf[pos + 9] != 0x7F || buf[pos + 10] < 3 || memcmp(buf + pos + 12, "NULL\0", 5) != 0)
            return OI_LINK_CLOSED;
        link->start = pos += GREETING_SIZE;
        link->state = 1;
    }
    for (;;) {
        if (end - pos < 2) return 0;
        unsigned flags = buf[pos];
        uint64_t size;
        size_t body;
        if (flags & ~(unsigned)(F_MORE | F_LONG | F_COMMAND)) return OI_LINK_CLOSED;
        if (flags & F_LONG) {
            if (end - pos < 9) return 0;
            size = 0;
            for (int i = 0; i < 8; i++) size = size << 8 | buf[pos + 1 + i];
            body = pos + 9;
        } else {
            size = buf[pos + 1];
            body = pos + 2;
        }
        if (size > MAX_FRAME) return OI_LINK_CLOSED;
        /* Every bound is checked on the size a frame declares, before any room is made for it. */
        if (flags & F_COMMAND) {
            if (size > OI_LINK_MAX_COMMAND_BYTES) {
                snprintf(link->why, sizeof link->why, "a command of %llu bytes (the limit is %d)", (unsigned long long)size, OI_LINK_MAX_COMMAND_BYTES);
                return OI_LINK_PROTOCOL;
            }
        } else if (link->state != 2) {
            return OI_LINK_CLOSED; /* a message before READY */
        } else if (n == 0 && size > max_first) {
            return oversized(link, OI_LINK_OVER_FIRST_FRAME, size);
        } else if (size > max_message || (message += size) > max_message) {
            return oversized(link, OI_LINK_OVER_MESSAGE, size > max_message ? size : message);
        }
        if (end - body < size) {
            link->need = (body - link->start) + (size_t)size; /* oi_link_fill makes room for it at once */
            return 0;
        }
        if (flags & F_COMMAND) {
            if (n) return OI_LINK_CLOSED; /* a command inside a multipart message */
            if (link->state == 1) {
                if (!check_ready(buf + body, (size_t)size)) return OI_LINK_CLOSED;
                link->state = 2;
            } else {
                int rc = on_command(link, buf + body, (size_t)size);
                if (rc != OI_LINK_OK) return rc; /* OI_LINK_CLOSED (ERROR, a PONG that could not go), OI_LINK_PROTOCOL */
            }
            link->start = pos = body + (size_t)size;
            continue;
        }
        if (n == OI_LINK_MAX_FRAMES) return oversized(link, OI_LINK_OVER_FRAMES, n + 1);
        if (n == link->frames_cap) {
            size_t cap = link->frames_cap ? link->frames_cap * 2 : 8;
            oi_frame *more = realloc(link->frames, cap * sizeof *more);
            if (!more) return OI_LINK_CLOSED;
            link->frames = more;
            link->frames_cap = cap;
        }
        link->frames[n].data = buf + body;
        link->frames[n].size = (size_t)size;
        n++;
        pos = body + (size_t)size;
        if (!(flags & F_MORE)) {
            link->start = pos;
            *frames_out = link->frames;
            *n_out = n;
            return 1;
        }
    }
}

int oi_link_wait(const oi_link *link, int64_t deadline_ms) {
    for (;;) {
        struct pollfd p = {link->fd, POLLIN, 0};
        int r = poll(&p, 1, poll_ms(deadline_ms));
        if (r > 0) return 1;
        if (r == 0) return 0;
        if (errno != EINTR) return 1; /* let the read report it */
    }
}

void oi_link_close(oi_link *link) {
    if (!link) return;
    if (link->fd >= 0) close(link->fd);
    free(link->address);
    free(link->buf);
    free(link->frames);
    free(link->pongs);
    free(link);
}
