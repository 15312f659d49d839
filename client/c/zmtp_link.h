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
 * What a worker sends is bounded where it arrives, as the Python clients do (client/wire/zmtp.py):
 *  - a command (READY included) of more than OI_LINK_MAX_COMMAND_BYTES, or more than
 *    OI_LINK_COMMAND_BURST commands at once and OI_LINK_COMMANDS_PER_S a second after that (a token
 *    bucket per link), breaks the protocol: OI_LINK_PROTOCOL, the link is dead, `why` says which;
 *  - a PONG is never waited for: it goes out without blocking, what the socket does not take waits in a
 *    small outbox (sent before the next message), and a PING is answered only while less than
 *    OI_LINK_PONG_BACKLOG_BYTES wait there (a worker that pings without reading once kept a client
 *    answering 200,000 PINGs, 100 ms each, past its request's deadline);
 *  - a message over max_message, a first frame (a reply's header) over max_first_frame, or more than
 *    OI_LINK_MAX_FRAMES frames: OI_LINK_OVERSIZED, `over` says which, nothing was made room for it.
 * No call waits past the deadline it is given, and oi_link_fill / oi_link_next each do a bounded amount
 * of work: a worker that keeps sending cannot keep a call inside either.
 *
 * Reading: oi_link_fill() takes what the kernel has; oi_link_next() hands out complete messages whose
 * frames point into the link's buffer, valid until the next oi_link_fill() or oi_link_close().
 */
#ifndef OPENINFER_ZMTP_LINK_H
#define OPENINFER_ZMTP_LINK_H

#include <stddef.h>
#include <stdint.h>

#include "openinfer.h"

#define OI_LINK_MAX_COMMAND_BYTES (64 * 1024) /* READY properties, PING contexts: nothing legitimate is larger */
#define OI_LINK_COMMAND_BURST 64               /* commands a worker may send at once ... */
#define OI_LINK_COMMANDS_PER_S 100             /* ... and a second after that (a heartbeat every 10 ms) */
#define OI_LINK_PONG_BACKLOG_BYTES (64 * 1024) /* a PING is answered only while less than this waits unsent */
#define OI_LINK_MAX_FRAMES 65536 /* frames in one message (a reply has a header and one per output): more is a worker gone wrong */

/* What an OI_LINK_OVERSIZED message broke (oi_link.over). */
enum { OI_LINK_OVER_MESSAGE = 1, OI_LINK_OVER_FIRST_FRAME = 2, OI_LINK_OVER_FRAMES = 3 };

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
    uint64_t max_first_frame; /* the largest first frame, a reply's header (0: OI_MAX_REPLY_HEADER_BYTES); likewise */
    int over;            /* what the last OI_LINK_OVERSIZED broke (OI_LINK_OVER_*) */
    uint64_t over_size;  /* the size that broke it: the frame's, the message's so far, or its frames */
    char why[96];        /* how the worker broke the protocol (OI_LINK_PROTOCOL) */
    double command_tokens;  /* the command bucket: OI_LINK_COMMAND_BURST, refilled OI_LINK_COMMANDS_PER_S */
    int64_t command_at_ns;  /* when it was last refilled */
    unsigned char *pongs;   /* PONG bytes the socket did not take yet (sent before anything else) */
    size_t pongs_len;
    /* bookkeeping of the users (openinfer.c, cwire.c); the link itself never reads these */
    uint64_t attached;   /* the serial of the lease attached here (0: none yet) */
    int draining;        /* the worker said GOAWAY: send nothing more here */
    int read_awaited;    /* its GOAWAY listed the request awaited here as read (oi_goaway_lists) */
    size_t outstanding;  /* requests sent here and not answered yet */
} oi_link;

/* Status of the functions below. */
enum {
    OI_LINK_OK = 0,
    OI_LINK_CLOSED = -1,  /* the worker closed the connection (or broke ZMTP): the link is dead */
    OI_LINK_TIMEOUT = -2, /* the deadline passed */
    OI_LINK_ERROR = -3,   /* a local failure (errno set): out of memory, no such socket, ... */
    OI_LINK_OVERSIZED = -4, /* the worker announced a message over a bound (oi_link.over): the link is dead, nothing was allocated for it */
    OI_LINK_PROTOCOL = -5   /* the worker broke a bound on its commands (oi_link.why): the link is dead */
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

/* Read what the kernel has now, without waiting: at most the message being received, or about 1 MiB,
 * whichever is more (oi_link_wait says when more is there). OI_LINK_OK (maybe nothing new),
 * OI_LINK_CLOSED, OI_LINK_ERROR (out of memory). */
int oi_link_fill(oi_link *link);

/* The next complete message: 1 and *frames / *n_frames set, 0 when none is complete yet,
 * OI_LINK_CLOSED when the worker broke ZMTP (or sent ERROR), OI_LINK_PROTOCOL when it broke a bound on
 * its commands (size, rate), OI_LINK_OVERSIZED when it announced a message over max_message, a first
 * frame over max_first_frame (checked on each frame's size before any room is made for it) or more than
 * OI_LINK_MAX_FRAMES frames. */
int oi_link_next(oi_link *link, const oi_frame **frames, size_t *n_frames);

/* Wait until the link is readable (or closed) or `deadline_ms` passes: 1 readable, 0 timeout. */
int oi_link_wait(const oi_link *link, int64_t deadline_ms);

void oi_link_close(oi_link *link);

/* CLOCK_MONOTONIC in ms and ns (the daemon's clock too). */
int64_t oi_now_ms(void);
int64_t oi_now_ns(void);

#endif /* OPENINFER_ZMTP_LINK_H */
