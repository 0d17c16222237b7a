//! The shared store: sessions in Redis, so several normserve replicas serve
//! the same sessions. Each write is a compare-and-set on the session version
//! (a Lua script, atomic in Redis); a replica whose cached state is stale gets
//! `Conflict`, reloads and recomputes.
//!
//! Keys (prefix `normserve:`): `session:{id}` a hash `{v: "incarnation:version",
//! r: record}` (the incarnation, the creation time, keeps a re-created session
//! from matching the old one's versions),
//! `sessions` a sorted set of ids (all score 0: lexicographic order for
//! listing), `format` the record format of this database.
//!
//! Durability is Redis's: run it with `appendonly yes` and
//! `appendfsync always` for "acknowledged means on disk" (see deploy/).

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

use crate::session::durable::{
    Meeting, SessionRecord, SessionStore, Stamp, StoreError, Stored, Written, FORMAT_VERSION,
};
use crate::session::SessionId;

const NAME: &str = "redis";
const PREFIX: &str = "normserve:";

const PUT: &str = r"
local current = redis.call('HGET', KEYS[1], 'v')
if ARGV[1] == '' then
  if current then return 0 end
elseif current ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'r', ARGV[3])
redis.call('ZADD', KEYS[2], 0, ARGV[4])
return 1
";

const DELETE: &str = r"
local current = redis.call('HGET', KEYS[1], 'v')
if ARGV[1] ~= '' and current ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
";

/// A rank arrives at a step meeting (`KEYS[1]`, a hash: `ws` world size,
/// `deadline` unix ms, `n` ranks arrived, `r<rank>` each rank's share,
/// `complete`, `failed` the reason, `told<rank>` ranks told of it).
/// ARGV: world_size, rank, share, deadline_unix_ms, ttl_ms.
const MEET: &str = r"
local h = KEYS[1]
local rank = ARGV[2]
local failed = redis.call('HGET', h, 'failed')
if failed then
  if redis.call('HEXISTS', h, 'told' .. rank) == 1 then
    redis.call('DEL', h)
  else
    redis.call('HSET', h, 'told' .. rank, '1')
    return {'failed', failed}
  end
end
local ws = redis.call('HGET', h, 'ws')
local field = 'r' .. rank
local existing = redis.call('HGET', h, field)
local reason = nil
if ws and ws ~= ARGV[1] then
  reason = 'world_size ' .. ARGV[1] .. ' differs from the step' .. string.char(39) .. 's ' .. ws .. ' (sent by the ranks before it)'
elseif existing and existing ~= ARGV[3] then
  reason = 'rank ' .. rank .. ' already arrived at this step with different data'
end
if reason then
  if redis.call('HEXISTS', h, 'complete') == 0 then
    redis.call('HSET', h, 'failed', 'step failed: rank ' .. rank .. ' sent an invalid request (' .. reason .. '); nothing was applied', 'told' .. rank, '1')
  end
  return {'invalid', reason}
end
if redis.call('HEXISTS', h, 'complete') == 1 and not existing then
  return {'failed', 'the step is being committed without rank ' .. rank}
end
if not ws then
  redis.call('HSET', h, 'ws', ARGV[1], 'deadline', ARGV[4], 'n', 0)
  redis.call('PEXPIRE', h, ARGV[5])
end
if not existing then
  redis.call('HSET', h, field, ARGV[3])
  local n = redis.call('HINCRBY', h, 'n', 1)
  if n == tonumber(ARGV[1]) then redis.call('HSET', h, 'complete', '1') end
end
return {'ok'}
";

/// A meeting as rank ARGV[1] sees it at ARGV[2] (unix ms): complete (the
/// shares in rank order), failed (past the deadline: naming the missing
/// ranks), or waiting.
const MEETING: &str = r"
local h = KEYS[1]
local rank = ARGV[1]
local failed = redis.call('HGET', h, 'failed')
if failed then
  redis.call('HSET', h, 'told' .. rank, '1')
  return {'failed', failed}
end
local ws = tonumber(redis.call('HGET', h, 'ws'))
if not ws then return {'failed', 'the step was withdrawn by its ranks'} end
if redis.call('HEXISTS', h, 'complete') == 1 then
  local out = {'complete'}
  for r = 0, ws - 1 do table.insert(out, redis.call('HGET', h, 'r' .. r)) end
  return out
end
if tonumber(ARGV[2]) >= tonumber(redis.call('HGET', h, 'deadline')) then
  local missing = {}
  for r = 0, ws - 1 do
    if redis.call('HEXISTS', h, 'r' .. r) == 0 then table.insert(missing, tostring(r)) end
  end
  local shown = missing
  local more = ''
  if #missing > 16 then
    shown = {unpack(missing, 1, 16)}
    more = ' and ' .. (#missing - 16) .. ' more'
  end
  local noun = 'ranks '
  if #missing == 1 then noun = 'rank ' end
  local reason = 'step timed out waiting for ' .. noun .. table.concat(shown, ', ') .. more .. ' of world_size ' .. ws .. ' (the step timeout, or a caller' .. string.char(39) .. 's deadline); nothing was applied'
  redis.call('HSET', h, 'failed', reason, 'told' .. rank, '1')
  return {'failed', reason}
end
return {'waiting'}
";

/// Withdraws rank ARGV[1] from an incomplete meeting.
const LEAVE: &str = r"
local h = KEYS[1]
if redis.call('HEXISTS', h, 'complete') == 1 or redis.call('HEXISTS', h, 'failed') == 1 then return 0 end
if redis.call('HDEL', h, 'r' .. ARGV[1]) == 1 then
  if redis.call('HINCRBY', h, 'n', -1) <= 0 then redis.call('DEL', h) end
end
return 1
";

/// Fails an incomplete meeting because rank ARGV[1] is invalid (ARGV[2]).
const FAIL: &str = r"
local h = KEYS[1]
if redis.call('HEXISTS', h, 'complete') == 1 or redis.call('HEXISTS', h, 'failed') == 1 then return 0 end
redis.call('HSET', h, 'failed', ARGV[2], 'told' .. ARGV[1], '1')
redis.call('PEXPIRE', h, ARGV[3])
return 1
";

/// How long a meeting's hash outlives its deadline (for late ranks to be
/// told of a failure).
const MEETING_LINGER_MS: u64 = 60_000;

pub struct RedisStore {
    connection: ConnectionManager,
    put: Script,
    delete: Script,
    meet: Script,
    meeting: Script,
    leave: Script,
    fail: Script,
}

fn meeting_key(key: &str) -> String {
    format!("{PREFIX}step:{key}")
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A script's reply `[kind, ...]` as a meeting.
fn meeting_of(reply: Vec<Vec<u8>>) -> Result<Meeting, StoreError> {
    let mut parts = reply.into_iter();
    let kind = parts.next().unwrap_or_default();
    let text = |parts: &mut std::vec::IntoIter<Vec<u8>>| {
        String::from_utf8_lossy(&parts.next().unwrap_or_default()).into_owned()
    };
    match kind.as_slice() {
        b"ok" | b"waiting" => Ok(Meeting::Waiting),
        b"complete" => Ok(Meeting::Complete(parts.collect())),
        b"failed" => Ok(Meeting::Failed(text(&mut parts))),
        b"invalid" => Ok(Meeting::Invalid(text(&mut parts))),
        other => Err(error(
            "meeting script",
            format!("unexpected reply {:?}", String::from_utf8_lossy(other)),
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("{url} holds normserve records of a newer format ({found}, this build reads up to {FORMAT_VERSION}); refusing to start")]
    NewerFormat { url: String, found: u32 },
}

fn error(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError {
        backend: NAME,
        message: format!("{context}: {e}"),
    }
}

fn session_key(id: &str) -> String {
    format!("{PREFIX}session:{id}")
}

fn index_key() -> String {
    format!("{PREFIX}sessions")
}

impl RedisStore {
    pub async fn open(url: &str) -> Result<Self, OpenError> {
        let connect = |e: redis::RedisError| OpenError::Connect {
            url: url.to_owned(),
            message: e.to_string(),
        };
        let client = redis::Client::open(url).map_err(connect)?;
        let mut connection = client.get_connection_manager().await.map_err(connect)?;
        let format_key = format!("{PREFIX}format");
        let found: Option<u32> = connection.get(&format_key).await.map_err(connect)?;
        match found {
            Some(found) if found > FORMAT_VERSION => {
                return Err(OpenError::NewerFormat {
                    url: url.to_owned(),
                    found,
                });
            }
            Some(_) => {}
            None => {
                let _: bool = connection
                    .set_nx(&format_key, FORMAT_VERSION)
                    .await
                    .map_err(connect)?;
            }
        }
        Ok(RedisStore {
            connection,
            put: Script::new(PUT),
            delete: Script::new(DELETE),
            meet: Script::new(MEET),
            meeting: Script::new(MEETING),
            leave: Script::new(LEAVE),
            fail: Script::new(FAIL),
        })
    }
}

fn written(applied: i64) -> Written {
    if applied == 1 {
        Written::Committed
    } else {
        Written::Conflict
    }
}

#[async_trait::async_trait]
impl SessionStore for RedisStore {
    fn name(&self) -> &'static str {
        NAME
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn load_all(&self) -> Result<Vec<(String, Stored)>, StoreError> {
        // Replicas load lazily; nothing to recover eagerly.
        Ok(Vec::new())
    }

    async fn load(&self, id: &SessionId) -> Result<Option<Stored>, StoreError> {
        let mut connection = self.connection.clone();
        let bytes: Option<Vec<u8>> = connection
            .hget(session_key(id.as_str()), "r")
            .await
            .map_err(|e| error("HGET", e))?;
        Ok(bytes.map(|b| SessionRecord::decode_record(&b)))
    }

    async fn version(&self, id: &SessionId) -> Result<Option<Stamp>, StoreError> {
        let mut connection = self.connection.clone();
        let token: Option<String> = connection
            .hget(session_key(id.as_str()), "v")
            .await
            .map_err(|e| error("HGET", e))?;
        Ok(token.as_deref().and_then(Stamp::parse))
    }

    async fn put(
        &self,
        record: &SessionRecord,
        previous: Option<Stamp>,
    ) -> Result<Written, StoreError> {
        let mut connection = self.connection.clone();
        let applied: i64 = self
            .put
            .key(session_key(&record.id))
            .key(index_key())
            .arg(previous.map(|p| p.token()).unwrap_or_default())
            .arg(Stamp::of(record).token())
            .arg(record.encode_record())
            .arg(&record.id)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| error("put script", e))?;
        Ok(written(applied))
    }

    async fn delete(&self, id: &SessionId, stamp: Option<Stamp>) -> Result<Written, StoreError> {
        let mut connection = self.connection.clone();
        let applied: i64 = self
            .delete
            .key(session_key(id.as_str()))
            .key(index_key())
            .arg(stamp.map(|p| p.token()).unwrap_or_default())
            .arg(id.as_str())
            .invoke_async(&mut connection)
            .await
            .map_err(|e| error("delete script", e))?;
        Ok(written(applied))
    }

    async fn ids_after(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionId>, StoreError> {
        let mut connection = self.connection.clone();
        let min = after.map_or_else(|| "-".to_owned(), |a| format!("({}", a.as_str()));
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(index_key())
            .arg(min)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut connection)
            .await
            .map_err(|e| error("ZRANGE", e))?;
        Ok(ids
            .iter()
            .filter_map(|id| SessionId::parse_key(id).ok())
            .collect())
    }

    async fn meet(
        &self,
        key: &str,
        world_size: u32,
        rank: u32,
        share: &[u8],
        deadline_unix_ms: u64,
    ) -> Result<Meeting, StoreError> {
        let mut connection = self.connection.clone();
        let ttl = deadline_unix_ms
            .saturating_sub(unix_ms_now())
            .saturating_add(MEETING_LINGER_MS);
        let reply: Vec<Vec<u8>> = self
            .meet
            .key(meeting_key(key))
            .arg(world_size)
            .arg(rank)
            .arg(share)
            .arg(deadline_unix_ms)
            .arg(ttl)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| error("meet script", e))?;
        meeting_of(reply)
    }

    async fn meeting(&self, key: &str, rank: u32, now_unix_ms: u64) -> Result<Meeting, StoreError> {
        let mut connection = self.connection.clone();
        let reply: Vec<Vec<u8>> = self
            .meeting
            .key(meeting_key(key))
            .arg(rank)
            .arg(now_unix_ms)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| error("meeting script", e))?;
        meeting_of(reply)
    }

    async fn leave(&self, key: &str, rank: u32) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = self
            .leave
            .key(meeting_key(key))
            .arg(rank)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| error("leave script", e))?;
        Ok(())
    }

    async fn fail_meeting(&self, key: &str, rank: u32, reason: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = self
            .fail
            .key(meeting_key(key))
            .arg(rank)
            .arg(reason)
            .arg(MEETING_LINGER_MS)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| error("fail script", e))?;
        Ok(())
    }
}
