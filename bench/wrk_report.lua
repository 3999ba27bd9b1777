-- Counts answers by status in each wrk thread and prints one JSON object at the end:
-- totals, socket errors, statuses and the latency distribution (microseconds).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
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
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(counts) do
    table.insert(parts, string.format('"%d": %d', status, n))
  end
  local e = summary.errors
  io.write("WRK_JSON ")
  io.write(string.format(
    '{"duration_us": %d, "requests": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"statuses": {%s}, "latency_us": {"min": %d, "max": %d, "mean": %.1f, "stdev": %.1f, ' ..
    '"percentiles": %s}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ", "),
    latency.min, latency.max, latency.mean, latency.stdev, percentiles(latency)))
end
