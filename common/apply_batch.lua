-- Apply one batch of trades of one source, atomically and idempotently.
--
-- The per-source seen-set (bitmap segments of 2^16 trade ids) decides: a trade whose bit is
-- already set was applied before (a retry, a replay, another feed host) and is skipped entirely.
-- Everything derived from a trade (stream entry, candle, last hash, pub/sub, compat keys) happens
-- only for newly seen trades, and every derived value is order-insensitive, so any interleaving
-- of live writes, replays and retries converges to the same state.
--
-- KEYS[1] trades stream   KEYS[2] last hash   KEYS[3] candle index (zset of minute starts)
-- KEYS[4..6] (only when compat is on) last_btc_price, last_btc_update_time, btc_movement_history
-- ARGV[1] seen-segment key prefix   ARGV[2] candle key prefix   ARGV[3] live channel ('' = none)
-- ARGV[4] seen TTL s   ARGV[5] stream MINID (ms)   ARGV[6] candle TTL s
-- ARGV[7] compat channel ('' = none)   ARGV[8] compat history length
-- ARGV[9] the batch as the bus carries it: a JSON array of [id, p, q, side, ts, rts, qty in 1e-8 units]
--         (numbers are exact: ids, times and units stay far below 2^53)
-- Returns {applied, skipped}.

local SEGMENT = 65536
local LIVE_JSON = '{"id":%s,"p":"%s","q":"%s","side":"%s","ts":%s,"rts":%s}'
local seen_prefix, candle_prefix, live = ARGV[1], ARGV[2], ARGV[3]
local seen_ttl, minid, candle_ttl = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
-- Compat keys are written when their three KEYS are given; the channel may be '' (no publish).
local compat_on, compat_channel, compat_len = #KEYS == 6, ARGV[7], tonumber(ARGV[8])
local batch = cjson.decode(ARGV[9])

local applied, skipped = 0, 0
local touched_segments = {}
local minutes = {}      -- minute start -> aggregate of the newly applied trades in it
local minute_order = {}
local best = nil        -- newly applied trade with the highest id

for _, row in ipairs(batch) do
  local id = row[1]
  local segment_key = seen_prefix .. math.floor(id / SEGMENT)
  if redis.call('SETBIT', segment_key, id % SEGMENT, 1) == 1 then
    skipped = skipped + 1
  else
    applied = applied + 1
    touched_segments[segment_key] = true
    local id_text = string.format('%d', id)
    local p, q, side, units = row[2], row[3], row[4], row[7]
    local ts, rts = string.format('%d', row[5]), string.format('%d', row[6])
    redis.call('XADD', KEYS[1], '*', 'id', id_text, 'p', p, 'q', q, 'side', side, 'ts', ts, 'rts', rts)
    if live ~= '' then
      redis.call('PUBLISH', live, string.format(LIVE_JSON, id_text, p, q, side, ts, rts))
    end

    local minute = math.floor(row[5] / 60000) * 60000
    local m = minutes[minute]
    local price = tonumber(p)
    if m == nil then
      m = {n = 0, units = 0, fid = id, fp = p, lid = id, lp = p, h = p, l = p, hn = price, ln = price}
      minutes[minute] = m
      table.insert(minute_order, minute)
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
end

-- Retention: trim once per batch (by entry id, i.e. the server's clock at write time).
if applied > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', minid)
end

for segment_key in pairs(touched_segments) do
  redis.call('EXPIRE', segment_key, seen_ttl)
end

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
if #minute_order > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. (tonumber(minid) - 60000))
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

-- The last hash never goes backwards: it only moves to a higher trade id.
-- best is a decoded row: {id, p, q, side, ts, rts, units}
if best ~= nil then
  local current = redis.call('HGET', KEYS[2], 'id')
  if not current or best[1] > tonumber(current) then
    redis.call('HSET', KEYS[2], 'id', string.format('%d', best[1]), 'p', best[2], 'q', best[3],
      'side', best[4], 'ts', string.format('%d', best[5]), 'rts', string.format('%d', best[6]))
    if compat_on then
      local compat_time = iso_time(best[5])
      redis.call('SET', KEYS[4], best[2])
      redis.call('SET', KEYS[5], compat_time)
      redis.call('RPUSH', KEYS[6], '{"price":' .. best[2] .. ',"timestamp":"' .. compat_time ..
        '","volume":' .. best[3] .. '}')
      redis.call('LTRIM', KEYS[6], -compat_len, -1)
      if compat_channel ~= '' then redis.call('PUBLISH', compat_channel, best[2]) end
    end
  end
end

return {applied, skipped}
