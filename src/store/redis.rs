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
    SessionRecord, SessionStore, Stamp, StoreError, Stored, Written, FORMAT_VERSION,
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

pub struct RedisStore {
    connection: ConnectionManager,
    put: Script,
    delete: Script,
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
}
