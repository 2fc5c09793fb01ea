-- Sets the mark KEYS[1] (a cool-down, an open circuit) to last at least ARGV[1] milliseconds;
-- a longer one already set stays.
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return 0
