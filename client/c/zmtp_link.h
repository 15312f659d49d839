/*
 * zmtp_link.h - one ZMTP 3.x connection to a worker endpoint of the direct path (docs/PROTOCOL.md 17.2),
 * spoken here over a plain non-blocking Unix stream socket instead of through libzmq.
 *
 * Internal to client/c and bench/cwire: not part of the public API (openinfer.h).
 *
 * Why not a libzmq DEALER: each libzmq hop hands every message to and from libzmq's I/O thread, and on
 * these VMs every wake-up costs ~50-80 us (DESIGN.md 7). Measured here (tiny model, c=1, p50): the same
 * request to the same worker took ~130 us over this link and ~200 us over a libzmq DEALER.
 *
 * The mechanism is NULL and we are a DEALER: our 64-byte greeting and READY (Socket-Type DEALER) go out
 * in one write, the worker's greeting and READY (Socket-Type ROUTER) are read and checked, then the
 * first message goes. Frames: flags byte (MORE=1, LONG=2, COMMAND=4), then a 1-byte or 8-byte big-endian size.
 * PING is answered with PONG, ERROR closes the link, other commands are ignored.
 *
 * Reading: oi_link_fill() takes what the kernel has; oi_link_next() hands out complete messages whose
 * frames point into the link's buffer, valid until the next oi_link_fill() or oi_link_close().
 */
#ifndef OPENINFER_ZMTP_LINK_H
#define OPENINFER_ZMTP_LINK_H

#include <stddef.h>
#include <stdint.h>

#include "openinfer.h"

typedef struct oi_link {
    int fd;
    char *address;       /* "ipc://PATH" */
    unsigned char *buf;  /* received bytes; [start, len) not yet handed out */
    size_t start, len, cap;
    size_t need;         /* bytes from `start` the message being received needs (0: unknown) */
    int state;           /* 0: the worker's greeting is due, 1: its READY, 2: open */
    oi_frame *frames;    /* the frames of the message oi_link_next returned last */
    size_t frames_cap;
    uint64_t max_message; /* the largest message taken (0: 1 GiB); a larger one ends the link, OI_LINK_OVERSIZED */
    /* bookkeeping of the users (openinfer.c, cwire.c); the link itself never reads these */
    uint64_t attached;   /* the serial of the lease attached here (0: none yet) */
    int draining;        /* the worker said GOAWAY: send nothing more here */
    size_t outstanding;  /* requests sent here and not answered yet */
} oi_link;

/* Status of the functions below. */
enum {
    OI_LINK_OK = 0,
    OI_LINK_CLOSED = -1,  /* the worker closed the connection (or broke ZMTP): the link is dead */
    OI_LINK_TIMEOUT = -2, /* the deadline passed */
    OI_LINK_ERROR = -3,   /* a local failure (errno set): out of memory, no such socket, ... */
    OI_LINK_OVERSIZED = -4 /* the worker announced a message over max_message: the link is dead, nothing was allocated for it */
};

/*
 * Connect to `address` (ipc://PATH), exchange greetings and READY (until `deadline_ms`), and send the
 * message `frames` (typically `attach`; none when n_frames is 0). Does not wait for the answer: read it
 * like any other reply.
 * Returns NULL with *status set (OI_LINK_ERROR with errno, e.g. ENOENT/ECONNREFUSED for a worker
 * that is gone, EAGAIN for a full backlog) on failure.
 */
oi_link *oi_link_connect(const char *address, const oi_frame *frames, size_t n_frames, int64_t deadline_ms, int *status);

/* Send one multipart message; waits (poll) while the socket is full, until `deadline_ms`
 * (CLOCK_MONOTONIC ms). A link left with half a message sent (timeout, closed) must be closed. */
int oi_link_send(oi_link *link, const oi_frame *frames, size_t n_frames, int64_t deadline_ms);

/* Read what the kernel has now, without waiting. OI_LINK_OK (maybe nothing new), OI_LINK_CLOSED,
 * OI_LINK_ERROR (out of memory). */
int oi_link_fill(oi_link *link);

/* The next complete message: 1 and *frames / *n_frames set, 0 when none is complete yet,
 * OI_LINK_CLOSED when the worker broke ZMTP (or sent ERROR), OI_LINK_OVERSIZED when it announced a
 * message over max_message (checked on each frame's size before any room is made for it) or of more than
 * 65,536 frames. */
int oi_link_next(oi_link *link, const oi_frame **frames, size_t *n_frames);

/* Wait until the link is readable (or closed) or `deadline_ms` passes: 1 readable, 0 timeout. */
int oi_link_wait(const oi_link *link, int64_t deadline_ms);

void oi_link_close(oi_link *link);

/* CLOCK_MONOTONIC in ms and ns (the daemon's clock too). */
int64_t oi_now_ms(void);
int64_t oi_now_ns(void);

#endif /* OPENINFER_ZMTP_LINK_H */
