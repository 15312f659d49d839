-- wrk script of bench/peers.py: POST the tiny model's input as raw float32 bytes (64 ones, 256 bytes:
-- what bench/cwire sends), and print the figures as one JSON line when the run is done.
--   wrk -t1 -c C -d Ns -s bench/peers_post.lua http://127.0.0.1:PORT/infer
wrk.method = "POST"
wrk.body = string.rep("\0\0\128\63", 64)
wrk.headers["Content-Type"] = "application/octet-stream"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'PEERS_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f, "mean_us": %.2f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
