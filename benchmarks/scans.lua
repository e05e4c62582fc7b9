-- wrk script for POST /v1/scans: every event unique, with valid codes.
--   wrk ... -s benchmarks/scans.lua URL -- DATA_FILE BATCH RUN_ID [DELAY_MS]
-- DATA_FILE is Lua written by capacity.py: token, venues = {...}, persons = {...}.
-- DELAY_MS > 0 paces each connection (for latency at a fixed, lower rate).

local threads = {}
local next_id = 1

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  dofile(args[1])
  batch = tonumber(args[2]) or 1
  run_id = args[3] or "R"
  delay_ms = tonumber(args[4]) or 0
  counter = 0
  headers = {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
  }
end

function delay()
  return delay_ms
end

function request()
  local now_ms = os.time() * 1000
  local events = {}
  for i = 1, batch do
    counter = counter + 1
    local v = venues[(counter % #venues) + 1]
    local p = persons[((counter * 7919) % #persons) + 1]
    local kind = (counter % 2 == 0) and "checkin" or "checkout"
    events[i] = string.format(
      '{"event_id":"W%s-%d-%d","kind":"%s","venue_code":"%s","person_code":"%s","scanned_at":%d}',
      run_id, tid, counter, kind, v, p, now_ms)
  end
  return wrk.format("POST", "/v1/scans", headers, '{"events":[' .. table.concat(events, ",") .. ']}')
end
