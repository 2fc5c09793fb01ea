-- Renews holder ARGV[1]'s lease in KEYS[1] (see hold.lua) for ARGV[2] ms more. Reply 1, or 0
-- when the lease was lost (it ended, or Redis lost it): nothing is added back.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local lease = tonumber(ARGV[2])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[1])
if redis.call('PTTL', KEYS[1]) < lease then redis.call('PEXPIRE', KEYS[1], lease) end
return 1
