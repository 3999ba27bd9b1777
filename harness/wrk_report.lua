-- Counts answers by status in each wrk thread and prints one JSON object at the end:
-- totals, socket errors, statuses and the latency distribution (microseconds).
-- For every 200 it also keeps the server's own time (the Server-Timing total, whole
-- milliseconds): the latency of admitted requests, without the time a connection
-- waited in the kernel's queue before the server took it.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  served_ms = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 200 then
    local timing = headers["Server-Timing"] or headers["server-timing"]
    local dur = timing and tonumber(string.match(timing, "total;dur=([%d.]+)"))
    if dur then
      local ms = math.floor(dur)
      served_ms[ms] = (served_ms[ms] or 0) + 1
    end
  end
end

-- A per-thread table of counts (by status, by ms), summed over the threads as JSON.
local function summed(name)
  local merged = {}
  for _, thread in ipairs(threads) do
    for key, n in pairs(thread:get(name)) do
      merged[key] = (merged[key] or 0) + n
    end
  end
  local parts = {}
  for key, n in pairs(merged) do
    table.insert(parts, string.format('"%d": %d', key, n))
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

local function percentiles(latency)
  local points = {}
  local ps = {}
  for p = 1, 99 do table.insert(ps, p) end
  for _, p in ipairs({0.1, 0.5, 99.5, 99.9, 99.99}) do table.insert(ps, p) end
  table.sort(ps)
  for _, p in ipairs(ps) do
    table.insert(points, string.format('"%g": %d', p, latency:percentile(p)))
  end
  return "{" .. table.concat(points, ", ") .. "}"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write("WRK_JSON ")
  io.write(string.format(
    '{"duration_us": %d, "requests": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"statuses": %s, "latency_us": {"min": %d, "max": %d, "mean": %.1f, "stdev": %.1f, ' ..
    '"percentiles": %s}, "served_ms": %s}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    summed("statuses"),
    latency.min, latency.max, latency.mean, latency.stdev, percentiles(latency),
    summed("served_ms")))
end
