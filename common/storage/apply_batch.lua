-- Apply one batch of trades of one source, atomically and idempotently.
--
-- The per-source seen-set (bitmap segments of 2^16 trade ids) decides: a trade whose bit is
-- already set was applied before (a retry, a replay, another feed host) and is skipped entirely.
-- Everything derived from a trade (stream entry, candle, last hash, pub/sub, compat keys) happens
-- only for newly seen trades, and every derived value is order-insensitive, so any interleaving
-- of live writes, replays and retries converges to the same state.
--
-- Three checks make silent faults loud or harmless:
--   * the epoch: the primary holds a per-source token that the feed host knows; a primary that lost
--     it (FLUSHALL, a restart without its data, a replica that never had it) refuses the batch with
--     an error starting BTCFEED-EPOCH, before anything is written;
--   * the floor: every id below it counts as seen (it moves with retention; seen segments below it
--     are deleted), so a very late copy of an old trade is skipped and counted, never applied again;
--   * every key the script writes is read first (its type checked), so a WRONGTYPE, an ASK or a
--     TRYAGAIN of a Cluster slot migration stops the script before its first write: never half a batch.
-- Retention is trimmed by the server's own clock (TIME), the same clock that made the entry ids.
--
-- KEYS[1] trades stream   KEYS[2] last hash   KEYS[3] candle index (zset of minute starts)
-- KEYS[4] meta hash (epoch, floor, lowseg)
-- KEYS[5..7] (only when compat is on) last_btc_price, last_btc_update_time, btc_movement_history
-- ARGV[1] seen-segment key prefix   ARGV[2] candle key prefix   ARGV[3] live channel ('' = none)
-- ARGV[4] retention ms   ARGV[5] candle TTL s   ARGV[6] compat channel ('' = none)
-- ARGV[7] compat history length   ARGV[8] expected epoch ('' = no check: the local copy)
-- ARGV[9] the batch as the bus carries it: a JSON array of [id, p, q, side, ts, rts, qty in 1e-8 units]
--         (numbers are exact: ids, times and units stay far below 2^53)
-- ARGV[10] how to write the seen-set: 'setrange' (default), or 'bitfield' where the primary's ACL
--         refuses SETRANGE (the feed's applier asks once and says so)
-- Returns {applied, skipped (seen before), floored (below the floor)}.

local SEGMENT = 65536
local SEGMENT_DELETES_PER_CALL = 32
local BITS_PER_CALL = 1000         -- the fallback's BITFIELD: bits per call, within unpack()'s limit
local LIVE_JSON = '{"id":%s,"p":"%s","q":"%s","side":"%s","ts":%s,"rts":%s}'
local seen_prefix, candle_prefix, live = ARGV[1], ARGV[2], ARGV[3]
local retention_ms, candle_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local compat_on, compat_channel, compat_len = #KEYS == 7, ARGV[6], tonumber(ARGV[7])
local epoch = ARGV[8]
local seen_by_bitfield = ARGV[10] == 'bitfield'
local meta = KEYS[4]

-- 1. The epoch, before anything else.
if epoch ~= '' then
  local held = redis.call('HGET', meta, 'epoch')
  if held ~= epoch then
    return redis.error_reply('BTCFEED-EPOCH the primary holds epoch ' .. tostring(held or 'none') ..
      ' for ' .. meta .. ', expected ' .. epoch)
  end
end

local batch = cjson.decode(ARGV[9])
local floor = tonumber(redis.call('HGET', meta, 'floor') or '0')

-- 2. Read every key this batch may write; decide which trades are new from the segments' bytes.
local function expect_type(key, wanted)
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and kind ~= wanted then
    error({err = 'WRONGTYPE btcfeed expected a ' .. wanted .. ' at ' .. key .. ' but it holds a ' .. kind})
  end
  return kind ~= 'none'
end
expect_type(KEYS[1], 'stream')
expect_type(KEYS[2], 'hash')
expect_type(KEYS[3], 'zset')
expect_type(meta, 'hash')
if compat_on then
  expect_type(KEYS[5], 'string'); expect_type(KEYS[6], 'string'); expect_type(KEYS[7], 'list')
end

local segments = {}       -- segment number -> {bytes = current bitmap (string), set = {offsets}}
local segment_order = {}
local fresh = {}          -- the rows to apply, in batch order
local in_batch = {}       -- ids already taken from this batch
local skipped, floored = 0, 0
for _, row in ipairs(batch) do
  local id = row[1]
  if id < floor then
    floored = floored + 1
  else
    local number = math.floor(id / SEGMENT)
    local segment = segments[number]
    if segment == nil then
      local key = seen_prefix .. number
      expect_type(key, 'string')
      segment = {bytes = redis.call('GET', key) or '', set = {}}
      segments[number] = segment
      table.insert(segment_order, number)
    end
    local offset = id % SEGMENT
    local byte = string.byte(segment.bytes, math.floor(offset / 8) + 1) or 0
    local seen = bit.band(byte, bit.rshift(128, offset % 8)) ~= 0
    if seen or in_batch[id] then
      skipped = skipped + 1
    else
      in_batch[id] = true
      table.insert(segment.set, offset)
      table.insert(fresh, row)
    end
  end
end

local minutes = {}        -- minute start -> aggregate of the new trades in it
local minute_order = {}
for _, row in ipairs(fresh) do
  local minute = math.floor(row[5] / 60000) * 60000
  if minutes[minute] == nil then
    expect_type(candle_prefix .. minute, 'hash')
    minutes[minute] = {n = 0}
    table.insert(minute_order, minute)
  end
end

if #fresh == 0 then
  return {0, skipped, floored}
end

-- 3. Writes. From here on nothing can fail for a reason the reads above did not rule out.
local now_ms
do
  local time = redis.call('TIME')
  now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local minid = math.max(0, now_ms - retention_ms)

-- The segment's bytes from its first to its last changed byte, with the batch's bits set (offset 0
-- = the first byte's high bit, as SETBIT), as SETRANGE's offset and value: one small command and
-- one small AOF record a segment, where BITFIELD took an operation per trade (0.87-0.92x the
-- primary's CPU per trade in 2,000-trade batches, `bench-apply --compare-with`).
local function seen_bytes(segment)
  local old, changed, first, last = segment.bytes, {}, nil, nil
  for _, offset in ipairs(segment.set) do
    local index = math.floor(offset / 8) + 1
    changed[index] = bit.bor(changed[index] or string.byte(old, index) or 0, bit.rshift(128, offset % 8))
    if first == nil or index < first then first = index end
    if last == nil or index > last then last = index end
  end
  local out = {}
  for index = first, last do
    out[#out + 1] = string.char(changed[index] or string.byte(old, index) or 0)
  end
  return first - 1, table.concat(out)
end

-- The same bits with BITFIELD, for a primary whose ACL predates SETRANGE in the feed's list
-- (deployment/primary-acl.conf).
local function set_bits_one_by_one(key, set)
  local args = {}
  for index, offset in ipairs(set) do
    args[#args + 1] = 'SET'; args[#args + 1] = 'u1'; args[#args + 1] = offset; args[#args + 1] = 1
    if index % BITS_PER_CALL == 0 or index == #set then
      redis.call('BITFIELD', key, unpack(args))
      args = {}
    end
  end
end

-- The seen-set is the first write: a refused SETRANGE stops the script before anything is written.
local function set_seen(key, segment)
  if seen_by_bitfield then
    set_bits_one_by_one(key, segment.set)
  else
    redis.call('SETRANGE', key, seen_bytes(segment))
  end
end

local lowseg = tonumber(redis.call('HGET', meta, 'lowseg') or '-1')
for _, number in ipairs(segment_order) do
  local segment = segments[number]
  if #segment.set > 0 then
    set_seen(seen_prefix .. number, segment)
    if lowseg < 0 or number < lowseg then lowseg = number end
  end
end
redis.call('HSET', meta, 'lowseg', lowseg)

local best = nil          -- new trade with the highest id
for _, row in ipairs(fresh) do
  local id = row[1]
  local id_text = string.format('%d', id)
  local p, q, side, units = row[2], row[3], row[4], row[7]
  local ts, rts = string.format('%d', row[5]), string.format('%d', row[6])
  redis.call('XADD', KEYS[1], '*', 'id', id_text, 'p', p, 'q', q, 'side', side, 'ts', ts, 'rts', rts)
  if live ~= '' then
    redis.call('PUBLISH', live, string.format(LIVE_JSON, id_text, p, q, side, ts, rts))
  end
  local m = minutes[math.floor(row[5] / 60000) * 60000]
  local price = tonumber(p)
  if m.n == 0 then
    m.units, m.fid, m.fp, m.lid, m.lp, m.h, m.l, m.hn, m.ln = 0, id, p, id, p, p, p, price, price
  end
  m.n = m.n + 1
  m.units = m.units + units
  if id < m.fid then m.fid, m.fp = id, p end
  if id > m.lid then m.lid, m.lp = id, p end
  if price > m.hn then m.h, m.hn = p, price end
  if price < m.ln then m.l, m.ln = p, price end
  if best == nil or id > best[1] then
    best = row      -- the decoded row itself: no new table per trade
  end
end

-- Retention: trim once per batch, by entry id, i.e. this server's clock at write time.
redis.call('XTRIM', KEYS[1], 'MINID', '~', minid)

-- Volume as an exact decimal string from the integer count of 1e-8 units.
local function units_to_decimal(units)
  local digits = string.format('%d', units)
  if #digits < 9 then digits = string.rep('0', 9 - #digits) .. digits end
  return string.sub(digits, 1, -9) .. '.' .. string.sub(digits, -8)
end

-- Candles: open = price of the lowest id, close = price of the highest id, high/low by value,
-- volume and count by sum. None of these depend on the order in which trades arrive.
for _, minute in ipairs(minute_order) do
  local m = minutes[minute]
  local key = candle_prefix .. minute
  local cur = redis.call('HMGET', key, 'fid', 'lid', 'h', 'l')
  local set = {}
  if not cur[1] or m.fid < tonumber(cur[1]) then
    table.insert(set, 'fid'); table.insert(set, m.fid); table.insert(set, 'o'); table.insert(set, m.fp)
  end
  if not cur[2] or m.lid > tonumber(cur[2]) then
    table.insert(set, 'lid'); table.insert(set, m.lid); table.insert(set, 'c'); table.insert(set, m.lp)
  end
  if not cur[3] or m.hn > tonumber(cur[3]) then
    table.insert(set, 'h'); table.insert(set, m.h)
  end
  if not cur[4] or m.ln < tonumber(cur[4]) then
    table.insert(set, 'l'); table.insert(set, m.l)
  end
  redis.call('HINCRBY', key, 'n', m.n)
  local units = redis.call('HINCRBY', key, 'vu', m.units)
  table.insert(set, 'v'); table.insert(set, units_to_decimal(units))
  table.insert(set, 't'); table.insert(set, minute)
  redis.call('HSET', key, unpack(set))
  redis.call('EXPIRE', key, candle_ttl)
  redis.call('ZADD', KEYS[3], minute, minute)
end

-- The floor follows the candles out of the window: exchanges number trades in time order, so every
-- id up to the last id of a minute that left the window belongs to a trade older than the window.
local cutoff = minid - 60000
local gone = redis.call('ZREVRANGEBYSCORE', KEYS[3], '(' .. cutoff, '-inf', 'LIMIT', 0, 1)
if #gone > 0 then
  local lid = tonumber(redis.call('HGET', candle_prefix .. gone[1], 'lid') or '-1')
  if lid + 1 > floor then
    floor = lid + 1
    redis.call('HSET', meta, 'floor', string.format('%d', floor))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. cutoff)
end
-- Seen segments wholly below the floor are no longer needed (the floor answers for their ids): a
-- few per call, oldest first, are let go (EXPIRE: the feed's ACL user has no DEL).
if lowseg >= 0 then
  local first_needed = math.floor(floor / SEGMENT)
  local deleted = 0
  while lowseg < first_needed and deleted < SEGMENT_DELETES_PER_CALL do
    redis.call('EXPIRE', seen_prefix .. lowseg, 0)
    lowseg = lowseg + 1
    deleted = deleted + 1
  end
  if deleted > 0 then redis.call('HSET', meta, 'lowseg', lowseg) end
end

-- ISO 8601 UTC text of a time in ms (days-to-civil conversion of the proleptic Gregorian calendar).
local function iso_time(ms)
  local seconds = math.floor(ms / 1000)
  local days = math.floor(seconds / 86400)
  local rest = seconds - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', year, month, day,
    math.floor(rest / 3600), math.floor(rest % 3600 / 60), rest % 60, ms % 1000)
end

-- A decimal string as a JSON number: JSON allows no leading zeros ("007.5" -> "7.5").
local function json_number(text)
  local stripped = string.gsub(text, '^0+(%d)', '%1')
  return stripped
end

-- The last hash never goes backwards: it only moves to a higher trade id.
-- best is a decoded row: {id, p, q, side, ts, rts, units}
local current = redis.call('HGET', KEYS[2], 'id')
if not current or best[1] > tonumber(current) then
  redis.call('HSET', KEYS[2], 'id', string.format('%d', best[1]), 'p', best[2], 'q', best[3],
    'side', best[4], 'ts', string.format('%d', best[5]), 'rts', string.format('%d', best[6]))
  if compat_on then
    local compat_time = iso_time(best[5])
    redis.call('SET', KEYS[5], best[2])
    redis.call('SET', KEYS[6], compat_time)
    redis.call('RPUSH', KEYS[7], '{"price":' .. json_number(best[2]) .. ',"timestamp":"' .. compat_time ..
      '","volume":' .. json_number(best[3]) .. '}')
    redis.call('LTRIM', KEYS[7], -compat_len, -1)
    if compat_channel ~= '' then redis.call('PUBLISH', compat_channel, best[2]) end
  end
end

return {#fresh, skipped, floored}
