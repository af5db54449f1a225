"""The Redis table's scripts: each call is one Lua script, so eviction, bounds and the
byte counters change atomically however many replicas write at once.

Keys under the table's prefix P: `born` (zset id -> stored time, ms: expiry and the
table-wide oldest), `o:<owner>` (zset id -> use tick: the owner's LRU/oldest order),
`owner`, `size`, `head` (hashes by id), `body:<id>` (string), `bytes` (total),
`ob` (hash owner -> bytes), `tick` (counter). Times come from the server's TIME, so
replicas with skewed clocks agree on expiry.
"""

PRELUDE = """
local P = KEYS[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function remove(id)
  local owner = redis.call('HGET', P .. 'owner', id)
  if not owner then return end
  local size = tonumber(redis.call('HGET', P .. 'size', id))
  redis.call('ZREM', P .. 'born', id)
  redis.call('ZREM', P .. 'o:' .. owner, id)
  redis.call('HDEL', P .. 'owner', id)
  redis.call('HDEL', P .. 'size', id)
  redis.call('HDEL', P .. 'head', id)
  redis.call('DEL', P .. 'body:' .. id)
  redis.call('DECRBY', P .. 'bytes', size)
  redis.call('HINCRBY', P .. 'ob', owner, -size)
end
local function expire(ttl_ms)
  local old = redis.call('ZRANGEBYSCORE', P .. 'born', '-inf', '(' .. (now_ms() - ttl_ms))
  for _, id in ipairs(old) do remove(id) end
end
local function holds(owner, id)
  return redis.call('ZSCORE', P .. 'o:' .. owner, id) ~= false
end
-- A read: is `id` the owner's and not expired? Under LRU the read makes it the newest used.
local function readable(owner, id, ttl_ms, lru)
  expire(tonumber(ttl_ms))
  if not holds(owner, id) then return false end
  if lru == '1' then redis.call('ZADD', P .. 'o:' .. owner, redis.call('INCR', P .. 'tick'), id) end
  return true
end
"""

# ARGV: id owner size ttl_ms max_count max_bytes own_count own_bytes lru evict_others
#       head body.  Returns 1 (kept) or 0 (table full).
PUT = PRELUDE + """
local id, owner, size = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_count, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local own_count, own_bytes = tonumber(ARGV[7]), tonumber(ARGV[8])
local evict_others = ARGV[10] == '1'
expire(tonumber(ARGV[4]))
remove(id)  -- a key already held is replaced (an update: its TTL starts again)
local own = P .. 'o:' .. owner
local function full()
  return redis.call('ZCARD', P .. 'born') + 1 > max_count
    or tonumber(redis.call('GET', P .. 'bytes') or '0') + size > max_bytes
end
local function mine_over()
  return redis.call('ZCARD', own) + 1 > own_count
    or tonumber(redis.call('HGET', P .. 'ob', owner) or '0') + size > own_bytes
end
while redis.call('ZCARD', own) > 0 and (mine_over() or (not evict_others and full())) do
  remove(redis.call('ZRANGE', own, 0, 0)[1])
end
while evict_others and redis.call('ZCARD', P .. 'born') > 0 and full() do
  remove(redis.call('ZRANGE', P .. 'born', 0, 0)[1])
end
if full() then return 0 end
redis.call('ZADD', own, redis.call('INCR', P .. 'tick'), id)
redis.call('ZADD', P .. 'born', now_ms(), id)
redis.call('HSET', P .. 'owner', id, owner)
redis.call('HSET', P .. 'size', id, size)
redis.call('HSET', P .. 'head', id, ARGV[11])
if #ARGV[12] > 0 then redis.call('SET', P .. 'body:' .. id, ARGV[12]) end
redis.call('INCRBY', P .. 'bytes', size)
redis.call('HINCRBY', P .. 'ob', owner, size)
return 1
"""

# ARGV: id owner ttl_ms lru slice.  Returns {head, {body in pieces of `slice` bytes}} or
# nil (absent, expired, not the owner's). In pieces: the client reads one at a time, giving
# way to others between them, not a whole body of tens of MB in one go.
GET = PRELUDE + """
local id = ARGV[1]
if not readable(ARGV[2], id, ARGV[3], ARGV[4]) then return nil end
local body, slice, pieces = P .. 'body:' .. id, tonumber(ARGV[5]), {}
for start = 0, redis.call('STRLEN', body) - 1, slice do
  pieces[#pieces + 1] = redis.call('GETRANGE', body, start, start + slice - 1)
end
return {redis.call('HGET', P .. 'head', id), pieces}
"""

# ARGV: id owner ttl_ms lru.  Returns the head or nil, as GET (its body is not read).
HEAD = PRELUDE + """
if not readable(ARGV[2], ARGV[1], ARGV[3], ARGV[4]) then return nil end
return redis.call('HGET', P .. 'head', ARGV[1])
"""

# ARGV: id owner.  Returns 1 (deleted) or 0.
DELETE = PRELUDE + """
if not holds(ARGV[2], ARGV[1]) then return 0 end
remove(ARGV[1])
return 1
"""

# ARGV: owner ttl_ms.  Returns the owner's heads in its order.
HEADS = PRELUDE + """
expire(tonumber(ARGV[2]))
local ids = redis.call('ZRANGE', P .. 'o:' .. ARGV[1], 0, -1)
local out = {}
for i = 1, #ids, 1000 do  -- in slices: unpack() is bounded by Lua's stack
  local part = redis.call('HMGET', P .. 'head', unpack(ids, i, math.min(i + 999, #ids)))
  for _, head in ipairs(part) do out[#out + 1] = head end
end
return out
"""

# ARGV: owner ttl_ms.  Returns {entries, bytes}.
OWNER_USAGE = PRELUDE + """
expire(tonumber(ARGV[2]))
return {redis.call('ZCARD', P .. 'o:' .. ARGV[1]),
        tonumber(redis.call('HGET', P .. 'ob', ARGV[1]) or '0')}
"""
