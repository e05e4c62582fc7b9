-- wrk script for POST /v1/scans: every event unique, with valid codes.
--   wrk ... -s benchmarks/scans.lua URL -- DATA_FILE BATCH RUN_ID [DELAY_MS]
-- DATA_FILE is Lua written by capacity.py: token, venues = {...}, persons = {...}.
-- DELAY_MS > 0 paces each connection (for latency at a fixed, lower rate).
--
-- wrk shares its core with Valkey in benchmarks/capacity.py, so a batch's body is not
-- formatted event by event: bodies enough to use every person once are cut into fixed
-- pieces at the start, and a request writes its number and the time into their slots
-- (wrk's CPU for batches of 100 fell from 9-11% to 6-7% of its core). A single event is
-- formatted whole, as before.

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
  -- bodies[b]: the pieces of one body; the pieces at number_slots[b] take the request's
  -- number, those at time_slots[b] its time.
  bodies, number_slots, time_slots = {}, {}, {}
  local n = 0
  for b = 1, (batch > 1 and math.ceil(#persons / batch) or 0) do
    local pieces, numbers, times = {'{"events":['}, {}, {}
    for i = 1, batch do
      n = n + 1
      local v = venues[(n % #venues) + 1]
      local p = persons[((n * 7919) % #persons) + 1]
      local kind = (n % 2 == 0) and "checkin" or "checkout"
      pieces[#pieces + 1] = string.format('%s{"event_id":"W%s-%d-', i > 1 and "," or "", run_id, tid)
      pieces[#pieces + 1] = ""
      numbers[#numbers + 1] = #pieces
      pieces[#pieces + 1] = string.format(
        '-%d","kind":"%s","venue_code":"%s","person_code":"%s","scanned_at":', i, kind, v, p)
      pieces[#pieces + 1] = ""
      times[#times + 1] = #pieces
      pieces[#pieces + 1] = "}"
    end
    pieces[#pieces + 1] = "]}"
    bodies[b], number_slots[b], time_slots[b] = pieces, numbers, times
  end
end

function delay()
  return delay_ms
end

local function single()
  local now_ms = os.time() * 1000
  local v = venues[(counter % #venues) + 1]
  local p = persons[((counter * 7919) % #persons) + 1]
  local kind = (counter % 2 == 0) and "checkin" or "checkout"
  local event = string.format(
    '{"event_id":"W%s-%d-%d","kind":"%s","venue_code":"%s","person_code":"%s","scanned_at":%d}',
    run_id, tid, counter, kind, v, p, now_ms)
  return wrk.format("POST", "/v1/scans", headers, '{"events":[' .. event .. ']}')
end

function request()
  counter = counter + 1
  if batch == 1 then return single() end
  local b = (counter % #bodies) + 1
  local pieces, number, now_ms = bodies[b], tostring(counter), tostring(os.time() * 1000)
  for _, slot in ipairs(number_slots[b]) do pieces[slot] = number end
  for _, slot in ipairs(time_slots[b]) do pieces[slot] = now_ms end
  return wrk.format("POST", "/v1/scans", headers, table.concat(pieces))
end
