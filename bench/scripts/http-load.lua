-- wrk: each request a product view of a random user among 100,000, with a
-- JSON body, as examples/http_service.rs and bench/src/bin/http_naive.rs take it.
local users = tonumber(os.getenv("USERS") or "100000")

function init(args)
  -- Each wrk thread has its own Lua state: seed each differently.
  math.randomseed(tonumber(tostring({}):match("0x(%x+)") or "1", 16) % 2147483647 + os.time())
end

function request()
  local user = math.random(1, users)
  local body = string.format('{"type":"view_product","product_id":"p%d"}', math.random(1, 1000))
  return wrk.format("POST", string.format("/malls/mall001/users/user%d/commands", user),
    { ["content-type"] = "application/json" }, body)
end

-- One JSON line with the figures, after wrk's own report.
function done(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    '{"requests": %d, "errors": %d, "requests_per_sec": %.1f, "p50_ms": %.2f, "p99_ms": %.2f, "p999_ms": %.2f}\n',
    summary.requests, errors, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000))
end
