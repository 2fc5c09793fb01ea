-- Takes one of a tenant's fleet-wide running places (a lease), when fewer than its quota are
-- held: KEYS[1] is the tenant's holders, a sorted set of holder ids scored by when their lease
-- ends (milliseconds of Redis's clock, so replicas' clocks do not matter); ended leases (a
-- killed replica's) are dropped first. ARGV: holder id, quota, lease (ms).
-- Reply {1, 0} held; {0, ms} full, the earliest lease ending in that long.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, math.max(0, tonumber(first[2]) - now)}
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
-- The set outlives its longest lease, and no longer.
if redis.call('PTTL', KEYS[1]) < lease then redis.call('PEXPIRE', KEYS[1], lease) end
return {1, 0}
