-- POST an OpenAI request body read from $WRK_BODY_FILE on every request, and print one JSON line of
-- results at the end. Everything is set at load time so wrk builds the request once (no Lua per request).
local path = os.getenv("WRK_BODY_FILE")
local f = assert(io.open(path, "rb"), "WRK_BODY_FILE must name a readable request body")
wrk.method = "POST"
wrk.path = os.getenv("WRK_PATH") or "/v1/chat/completions"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"errors_connect":%d,"errors_read":%d,'
      .. '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"latency_us":{"min":%d,"mean":%.1f,'
      .. '"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
