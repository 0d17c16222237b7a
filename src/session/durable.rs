//! What the registry needs from durable storage: the [`SessionStore`] trait
//! (implemented by the backends in `crate::store`) and the stored form of a
//! session, [`SessionRecord`], with its versioned, checksummed encoding.
//!
//! Encoding: `b"NSRC"`, format version (u32 LE), CRC-32 of the payload (u32
//! LE), then the payload (a protobuf message defined below, so fields can be
//! added compatibly). A record that fails the checks is reported as corrupt,
//! never silently replaced; a record of a newer format is refused.

use std::collections::BTreeMap;

use prost::Message;

use super::SessionId;

/// The format of the stores (their `format` mark) and of every record but
/// an exact-statistics session's.
pub const FORMAT_VERSION: u32 = 1;
/// The newest record format this build reads: format 2 is written only for
/// exact-statistics sessions (their sums are fields that a format 1 reader
/// would drop, serving wrong statistics), so a build that reads only format
/// 1 refuses those records instead. Stores and other records keep format 1.
pub const RECORD_FORMAT_MAX: u32 = 2;
const MAGIC: &[u8; 4] = b"NSRC";
const HEADER_LEN: usize = 12;

/// One session as stored: configuration, state, recent request ids.
#[derive(Clone, PartialEq, Message)]
pub struct SessionRecord {
    /// The session's key: its name, or `tenant/name`.
    #[prost(string, tag = "1")]
    pub id: String,
    /// 1, 2 or 3 (BatchNorm1d/2d/3d).
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    #[prost(int64, tag = "3")]
    pub num_features: i64,
    /// Creation eps and momentum (idempotent creates compare these).
    #[prost(double, tag = "4")]
    pub created_eps: f64,
    #[prost(double, optional, tag = "5")]
    pub created_momentum: Option<f64>,
    #[prost(bool, tag = "6")]
    pub affine: bool,
    #[prost(bool, tag = "7")]
    pub track_running_stats: bool,
    /// 1 float32, 2 float64, 3 float16, 4 bfloat16.
    #[prost(uint32, tag = "8")]
    pub param_dtype: u32,
    /// 1 train, 2 eval.
    #[prost(uint32, tag = "9")]
    pub default_mode: u32,
    #[prost(bool, tag = "10")]
    pub reject_non_finite: bool,
    #[prost(btree_map = "string, string", tag = "11")]
    pub labels: BTreeMap<String, String>,
    /// "cpu" or "cuda:N".
    #[prost(string, tag = "12")]
    pub device: String,
    /// Current eps and momentum (None: cumulative average).
    #[prost(double, tag = "13")]
    pub eps: f64,
    #[prost(double, optional, tag = "14")]
    pub momentum: Option<f64>,
    /// Raw little-endian values in `param_dtype`, (C,); absent when the layer
    /// has no such tensor.
    #[prost(bytes = "vec", optional, tag = "15")]
    pub weight: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "16")]
    pub bias: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "17")]
    pub running_mean: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "18")]
    pub running_var: Option<Vec<u8>>,
    #[prost(int64, tag = "19")]
    pub num_batches_tracked: i64,
    #[prost(uint64, tag = "20")]
    pub version: u64,
    #[prost(int64, tag = "21")]
    pub created_at_unix_nanos: i64,
    #[prost(int64, tag = "22")]
    pub updated_at_unix_nanos: i64,
    /// Oldest first.
    #[prost(message, repeated, tag = "23")]
    pub recent_requests: Vec<RecentRequest>,
    /// Created eps/momentum mode: true when created with the cumulative average.
    #[prost(bool, tag = "24")]
    pub created_cumulative: bool,
    /// The tenant that owns the session; "" (also in records written before
    /// tenants existed) is the default tenant. `id` is the full key, which
    /// starts with `tenant/` for any other tenant.
    #[prost(string, tag = "25")]
    pub tenant: String,
    /// Created with exact statistics (format 2).
    #[prost(bool, tag = "40")]
    pub exact_statistics: bool,
    /// The exact sums of an exact-statistics session (format 2).
    #[prost(message, optional, tag = "41")]
    pub exact: Option<ExactSumsRecord>,
    /// The session's synchronized-step timeout in seconds (absent in records
    /// written before steps existed: the default).
    #[prost(double, optional, tag = "42")]
    pub step_timeout_seconds: Option<f64>,
}

/// An exact session's sums (see `numerics::exact`).
#[derive(Clone, PartialEq, Message)]
pub struct ExactSumsRecord {
    /// Values seen per channel.
    #[prost(uint64, tag = "1")]
    pub count: u64,
    /// One per channel, in channel order.
    #[prost(message, repeated, tag = "2")]
    pub channels: Vec<ChannelSumsRecord>,
}

/// One channel's sums as little-endian 64-bit limbs, no high zero limb.
#[derive(Clone, PartialEq, Message)]
pub struct ChannelSumsRecord {
    /// Sum of the positive values, units of 2^-1074.
    #[prost(fixed64, repeated, tag = "1")]
    pub positive: Vec<u64>,
    /// Sum of |x| over the negative values, units of 2^-1074.
    #[prost(fixed64, repeated, tag = "2")]
    pub negative: Vec<u64>,
    /// Sum of x², units of 2^-2148.
    #[prost(fixed64, repeated, tag = "3")]
    pub squares: Vec<u64>,
}

/// A request id applied to the session, stored with the state it produced so
/// that a retry after a restart is recognised and not applied twice.
#[derive(Clone, PartialEq, Message)]
pub struct RecentRequest {
    #[prost(string, tag = "1")]
    pub request_id: String,
    /// "Forward", "ResetRunningStats", "UpdateParameters" or "ImportState".
    #[prost(string, tag = "2")]
    pub call: String,
    #[prost(uint64, tag = "3")]
    pub version: u64,
    #[prost(int64, tag = "4")]
    pub num_batches_tracked: i64,
}

/// Why a stored record cannot be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record is corrupt: {0}")]
    Corrupt(String),
    #[error("record was written by a newer normserve (format {found}, this build reads up to {RECORD_FORMAT_MAX})")]
    NewerFormat { found: u32 },
}

impl SessionRecord {
    pub fn encode_record(&self) -> Vec<u8> {
        let payload = self.encode_to_vec();
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        let format = if self.exact_statistics {
            RECORD_FORMAT_MAX
        } else {
            FORMAT_VERSION
        };
        out.extend_from_slice(&format.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    pub fn decode_record(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC {
            return Err(RecordError::Corrupt("bad header".into()));
        }
        let word = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let format = word(4);
        if format > RECORD_FORMAT_MAX {
            return Err(RecordError::NewerFormat { found: format });
        }
        let payload = &bytes[HEADER_LEN..];
        if crc32fast::hash(payload) != word(8) {
            return Err(RecordError::Corrupt("checksum mismatch".into()));
        }
        SessionRecord::decode(payload).map_err(|e| RecordError::Corrupt(e.to_string()))
    }
}

/// A storage backend failed (I/O, connection); the operation did not happen
/// or its outcome is unknown. Maps to UNAVAILABLE.
#[derive(Debug, Clone, thiserror::Error)]
#[error("session store ({backend}): {message}")]
pub struct StoreError {
    pub backend: &'static str,
    pub message: String,
}

/// A session's version within one incarnation. A session deleted and created
/// again under the same id is a new incarnation (its creation time), so a
/// compare-and-set can never mistake the new session for the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Creation time of the incarnation, Unix nanoseconds.
    pub incarnation: i64,
    pub version: u64,
}

impl Stamp {
    pub fn of(record: &SessionRecord) -> Stamp {
        Stamp {
            incarnation: record.created_at_unix_nanos,
            version: record.version,
        }
    }

    /// "incarnation:version", as stored by backends that keep a string.
    pub fn token(&self) -> String {
        format!("{}:{}", self.incarnation, self.version)
    }

    pub fn parse(token: &str) -> Option<Stamp> {
        let (incarnation, version) = token.split_once(':')?;
        Some(Stamp {
            incarnation: incarnation.parse().ok()?,
            version: version.parse().ok()?,
        })
    }
}

/// Outcome of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Committed,
    /// The stored version was not the expected one; nothing was written.
    Conflict,
}

/// A stored record, or why it cannot be read.
pub type Stored = Result<SessionRecord, RecordError>;

/// Durable storage of session records. Every method that returns `Ok` has
/// made its effect durable (as far as the backend's own configuration goes).
#[async_trait::async_trait]
pub trait SessionStore: Send + Sync {
    /// "embedded" or "redis", for logs and the info RPC.
    fn name(&self) -> &'static str;

    /// True when other processes change the records too, so a cached session
    /// must be checked against the store before use.
    fn is_shared(&self) -> bool;

    /// Every record, for eager recovery at start-up (unshared stores).
    async fn load_all(&self) -> Result<Vec<(String, Stored)>, StoreError>;

    /// One record.
    async fn load(&self, id: &SessionId) -> Result<Option<Stored>, StoreError>;

    /// The stored stamp of a session, cheaply.
    async fn version(&self, id: &SessionId) -> Result<Option<Stamp>, StoreError>;

    /// Writes `record` if the stored stamp equals `previous` (`None`: the
    /// session must not exist yet).
    async fn put(
        &self,
        record: &SessionRecord,
        previous: Option<Stamp>,
    ) -> Result<Written, StoreError>;

    /// Deletes the session if its stored stamp equals `stamp` (`None`:
    /// whatever is stored, e.g. an unreadable record).
    async fn delete(&self, id: &SessionId, stamp: Option<Stamp>) -> Result<Written, StoreError>;

    /// Ids in order after `after`, at most `limit` (shared stores list from here).
    async fn ids_after(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionId>, StoreError>;

    // ---- the rendezvous of synchronized steps, for shared stores --------
    // A store that is not shared leaves them as they are: its replica is the
    // only one, and the registry's in-process barrier is its rendezvous.

    /// Places `rank`'s `share` (its per-channel statistics, a few bytes per
    /// channel, never a tensor) in the meeting `key` of `world_size` ranks,
    /// which fails at `deadline_unix_ms` unless complete. A rank told of a
    /// failed attempt that arrives again starts a new attempt.
    async fn meet(
        &self,
        key: &str,
        world_size: u32,
        rank: u32,
        share: &[u8],
        deadline_unix_ms: u64,
    ) -> Result<Meeting, StoreError> {
        let _ = (key, world_size, rank, share, deadline_unix_ms);
        Err(no_meetings(self.name()))
    }

    /// The meeting as `rank` sees it now (past its deadline: failed, naming
    /// the missing ranks).
    async fn meeting(&self, key: &str, rank: u32, now_unix_ms: u64) -> Result<Meeting, StoreError> {
        let _ = (key, rank, now_unix_ms);
        Err(no_meetings(self.name()))
    }

    /// Withdraws `rank` from an incomplete meeting (its caller went away).
    async fn leave(&self, key: &str, rank: u32) -> Result<(), StoreError> {
        let _ = (key, rank);
        Err(no_meetings(self.name()))
    }

    /// Fails an incomplete meeting with `reason` (an invalid rank's).
    async fn fail_meeting(&self, key: &str, rank: u32, reason: &str) -> Result<(), StoreError> {
        let _ = (key, rank, reason);
        Err(no_meetings(self.name()))
    }
}

fn no_meetings(backend: &'static str) -> StoreError {
    StoreError {
        backend,
        message: "this store holds no step meetings (its replica's own barrier is the rendezvous)"
            .into(),
    }
}

/// A shared rendezvous as one rank sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Meeting {
    /// Not all ranks have arrived.
    Waiting,
    /// Every rank arrived: their shares in rank order.
    Complete(Vec<Vec<u8>>),
    /// The attempt failed; every rank is told this reason.
    Failed(String),
    /// This rank's own arrival is invalid (the others are told).
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SessionRecord {
        SessionRecord {
            id: "a".into(),
            kind: 1,
            num_features: 3,
            weight: Some(vec![0, 0, 128, 63]),
            version: 7,
            ..Default::default()
        }
    }

    #[test]
    fn records_round_trip() {
        let bytes = record().encode_record();
        assert_eq!(SessionRecord::decode_record(&bytes), Ok(record()));
    }

    #[test]
    fn a_flipped_byte_is_corruption_not_a_fresh_session() {
        let mut bytes = record().encode_record();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x40;
        assert!(matches!(
            SessionRecord::decode_record(&bytes),
            Err(RecordError::Corrupt(_))
        ));
        assert!(matches!(
            SessionRecord::decode_record(b"NS"),
            Err(RecordError::Corrupt(_))
        ));
    }

    #[test]
    fn records_without_exact_sums_keep_format_1_and_exact_ones_round_trip() {
        let plain = record().encode_record();
        assert_eq!(plain[4..8], 1u32.to_le_bytes());
        let exact = SessionRecord {
            exact_statistics: true,
            exact: Some(ExactSumsRecord {
                count: 4,
                channels: vec![ChannelSumsRecord {
                    positive: vec![1, u64::MAX],
                    negative: vec![],
                    squares: vec![0, 0, 7],
                }],
            }),
            ..record()
        };
        let bytes = exact.encode_record();
        assert_eq!(bytes[4..8], 2u32.to_le_bytes());
        assert_eq!(SessionRecord::decode_record(&bytes), Ok(exact));
    }

    #[test]
    fn a_newer_format_is_refused() {
        let mut bytes = record().encode_record();
        bytes[4] = 9;
        assert_eq!(
            SessionRecord::decode_record(&bytes),
            Err(RecordError::NewerFormat { found: 9 })
        );
    }
}
