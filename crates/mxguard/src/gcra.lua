-- Fleet-wide token buckets in GCRA form (see cluster.rs).
-- KEYS[i]: one bucket (its value: the instant, in microseconds of Redis's
-- clock, at which it is full again; absent = full).
-- ARGV[2i-1], ARGV[2i]: that bucket's interval between tokens (us) and
-- burst. All or nothing: a token is taken from every bucket, or from none.
-- Returns {0, 0} when admitted, {i, wait_us} when bucket i is empty.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local next_tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  local over = (new_tat - now) - interval * burst
  if over > 0 then
    return {i, over}
  end
  next_tats[i] = new_tat
end
for i = 1, #KEYS do
  -- The key lives until the bucket is full again: then it carries nothing.
  local ttl_ms = math.floor((next_tats[i] - now) / 1000) + 1
  redis.call('SET', KEYS[i], string.format('%.0f', next_tats[i]), 'PX', ttl_ms)
end
return {0, 0}
