"""The front door: the daemon's own listening socket, its connections and who is on each of them.

The daemon speaks ZMTP itself here (openinfer.wire.zmtp) instead of handing its public socket to a
libzmq ROUTER, so that the things a libzmq ROUTER decides from what peers send — routing ids, accepting
connections up to EMFILE, buffering without telling anyone — are decided here from what the kernel says:
each connection gets an id of ours, its peer's uid/gid/pid (SO_PEERCRED) or CURVE key, a place in the
connection caps and an account of the bytes held for it.
"""
