-- callout's fleet check (one EVALSHA per attempt): the destination's circuit and cool-down
-- marks, then every GCRA bucket the attempt must pass, all or nothing: every bucket is taken
-- when every one allows and no mark is set, none otherwise. The clock is Redis's (TIME), so
-- replicas' clocks do not matter.
-- KEYS: the marks when ARGV[1] is 2 (circuit, then cool-down), then one key per bucket.
-- ARGV[1]: how many marks lead KEYS (0 or 2); then per bucket its emission interval and its
-- burst tolerance (interval x (burst - 1)), in microseconds. A bucket's value is its
-- theoretical arrival time (microseconds), expiring once the bucket is full again.
-- Reply {code, microseconds, bucket}: 0 allowed; 1 circuit open for that long; 2 cooling down
-- for that long; 3 bucket number `bucket` (1-based) must wait that long.
local marks = tonumber(ARGV[1])
if marks == 2 then
  local open = redis.call('PTTL', KEYS[1])
  if open > 0 then return {1, open * 1000, 0} end
  local cool = redis.call('PTTL', KEYS[2])
  if cool > 0 then return {2, cool * 1000, 0} end
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local next_tat = {}
local worst, which = 0, 0
for i = 1, #KEYS - marks do
  local interval = tonumber(ARGV[2 * i])
  local tolerance = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[marks + i])) or now
  if tat < now then tat = now end
  local wait = tat - tolerance - now
  if wait > 0 then
    if wait > worst then worst, which = wait, i end
  else
    next_tat[i] = tat + interval
  end
end
if which > 0 then return {3, worst, which} end
for i = 1, #KEYS - marks do
  local ttl = math.ceil((next_tat[i] - now) / 1000)
  redis.call('SET', KEYS[marks + i], string.format('%.0f', next_tat[i]), 'PX', string.format('%.0f', ttl))
end
return {0, 0, 0}
