//! The memory budget: one server-wide number of bytes that everything the
//! server holds on behalf of its clients must fit in, whoever asked for it —
//! session state, replay caches, request and reply messages in flight, the
//! replies a stream computes ahead of its reader, and the embedded store's
//! page cache.
//!
//! A part about to hold memory asks first ([`MemoryBudget::try_charge`]);
//! what would exceed the budget is refused with [`BudgetExhausted`] before
//! anything is allocated, so the caller can refuse its request whole
//! (RESOURCE_EXHAUSTED) and nothing is lost. The answer is a [`Charge`]: the
//! bytes stay counted for as long as it lives and are given back when it is
//! dropped, so no path (an error, a cancelled request, an evicted session)
//! can forget to release them. A charge can grow and shrink in place for
//! holders whose size changes (a replay log, a stream's look-ahead).
//!
//! Memory that must be held whatever the budget says — state recovered from
//! the store at start-up, a reply already computed for an applied mutation —
//! is charged with [`MemoryBudget::charge_anyway`]: it counts, so new
//! requests are refused while it is held, but it is never dropped.
//!
//! The counters are lock-free atomics: one total compared with the limit,
//! and one per [`Kind`] for the metrics and GetServerInfo.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Requests and outputs up to this size are charged but never refused: they
/// cost little, and refusing them once sessions fill the budget would stop
/// health checks and every call on the sessions held.
pub const ALWAYS_ADMITTED_BYTES: u64 = 64 * 1024;

/// `bytes` of `kind` from `budget`: refused when over it, unless small
/// (at most [`ALWAYS_ADMITTED_BYTES`]), which is charged anyway.
pub fn charge_unless_large(
    budget: &Arc<MemoryBudget>,
    bytes: u64,
    kind: Kind,
) -> Result<Charge, BudgetExhausted> {
    if bytes <= ALWAYS_ADMITTED_BYTES {
        Ok(budget.charge_anyway(bytes, kind))
    } else {
        budget.try_charge(bytes, kind)
    }
}

/// What the bytes of a charge hold (the metric label and the error text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Sessions' tensors and bookkeeping, by their configuration.
    Sessions,
    /// Results kept to answer retried request ids (forward outputs, snapshots).
    ReplayCaches,
    /// Request messages being received and decoded, until their call ends.
    Requests,
    /// Reply messages being sent.
    Replies,
    /// Replies a stream has computed that its client has not read yet.
    StreamLookahead,
    /// The embedded store's page cache (charged once, at start-up).
    StoreCache,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Sessions,
        Kind::ReplayCaches,
        Kind::Requests,
        Kind::Replies,
        Kind::StreamLookahead,
        Kind::StoreCache,
    ];

    /// The `kind` label of `normserve_memory_budget_charged_bytes`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sessions => "sessions",
            Kind::ReplayCaches => "replay_caches",
            Kind::Requests => "requests",
            Kind::Replies => "replies",
            Kind::StreamLookahead => "stream_lookahead",
            Kind::StoreCache => "store_cache",
        }
    }

    /// What the bytes are, in error texts.
    fn describe(self) -> &'static str {
        match self {
            Kind::Sessions => "session state",
            Kind::ReplayCaches => "replay caches",
            Kind::Requests => "request messages in flight",
            Kind::Replies => "reply messages in flight",
            Kind::StreamLookahead => "stream look-ahead",
            Kind::StoreCache => "the store's cache",
        }
    }

    fn index(self) -> usize {
        match self {
            Kind::Sessions => 0,
            Kind::ReplayCaches => 1,
            Kind::Requests => 2,
            Kind::Replies => 3,
            Kind::StreamLookahead => 4,
            Kind::StoreCache => 5,
        }
    }
}

/// A charge refused: `requested` more bytes of `kind` do not fit beside the
/// `charged` ones under `limit`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "memory budget of {} exhausted: {} more of {} do not fit beside the {} charged (--memory-budget)",
    format_bytes(*.limit),
    format_bytes(*.requested),
    .kind.describe(),
    format_bytes(*.charged)
)]
pub struct BudgetExhausted {
    pub kind: Kind,
    pub requested: u64,
    pub charged: u64,
    pub limit: u64,
}

/// The server-wide budget (shared as an `Arc`: charges point back to it).
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    total: AtomicU64,
    by_kind: [AtomicU64; 6],
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            total: AtomicU64::new(0),
            by_kind: Default::default(),
        })
    }

    /// A budget that refuses nothing (it still counts): for tests and
    /// embedders that do not limit memory.
    pub fn unlimited() -> Arc<MemoryBudget> {
        MemoryBudget::new(u64::MAX)
    }

    /// The budget, in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now, of every kind.
    pub fn charged(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Bytes of `kind` charged now.
    pub fn charged_for(&self, kind: Kind) -> u64 {
        self.by_kind[kind.index()].load(Ordering::Relaxed)
    }

    /// `bytes` of `kind`, counted until the charge is dropped; refused when
    /// they would take the total over the budget.
    pub fn try_charge(self: &Arc<Self>, bytes: u64, kind: Kind) -> Result<Charge, BudgetExhausted> {
        let mut charge = self.empty(kind);
        charge.try_grow(bytes)?;
        Ok(charge)
    }

    /// `bytes` of `kind`, counted even beyond the budget: for memory that is
    /// held whatever the budget says (state recovered at start-up, replies of
    /// mutations already applied). It makes later charges fail until it is
    /// given back.
    pub fn charge_anyway(self: &Arc<Self>, bytes: u64, kind: Kind) -> Charge {
        let mut charge = self.empty(kind);
        charge.grow_anyway(bytes);
        charge
    }

    /// A charge of 0 bytes of `kind`, to grow later.
    pub fn empty(self: &Arc<Self>, kind: Kind) -> Charge {
        Charge {
            budget: self.clone(),
            kind,
            bytes: 0,
        }
    }

    fn take(&self, bytes: u64, kind: Kind) -> Result<(), BudgetExhausted> {
        self.total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |charged| {
                charged.checked_add(bytes).filter(|&sum| sum <= self.limit)
            })
            .map_err(|charged| BudgetExhausted {
                kind,
                requested: bytes,
                charged,
                limit: self.limit,
            })?;
        self.by_kind[kind.index()].fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    fn take_anyway(&self, bytes: u64, kind: Kind) {
        // Saturating: an absurd sum pins the total at the maximum (refusing
        // everything) instead of wrapping to a small number.
        let _ = self
            .total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |charged| {
                Some(charged.saturating_add(bytes))
            });
        self.by_kind[kind.index()].fetch_add(bytes, Ordering::Relaxed);
    }

    fn give_back(&self, bytes: u64, kind: Kind) {
        self.total.fetch_sub(bytes, Ordering::Relaxed);
        self.by_kind[kind.index()].fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Bytes held against a [`MemoryBudget`], given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<MemoryBudget>,
    kind: Kind,
    bytes: u64,
}

impl Charge {
    /// The bytes this charge holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Holds `bytes` more, if they fit in the budget (unchanged otherwise).
    pub fn try_grow(&mut self, bytes: u64) -> Result<(), BudgetExhausted> {
        self.budget.take(bytes, self.kind)?;
        self.bytes += bytes;
        Ok(())
    }

    /// Holds `bytes` more, even beyond the budget (see
    /// [`MemoryBudget::charge_anyway`]).
    pub fn grow_anyway(&mut self, bytes: u64) {
        self.budget.take_anyway(bytes, self.kind);
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// Gives back `bytes` (at most what the charge holds).
    pub fn shrink(&mut self, bytes: u64) {
        let bytes = bytes.min(self.bytes);
        self.budget.give_back(bytes, self.kind);
        self.bytes -= bytes;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes, self.kind);
    }
}

/// A size as an operator writes it: a number of bytes, optionally with a
/// unit, binary (`KiB`, `MiB`, `GiB`, `TiB`, or Kubernetes' `Ki`, `Mi`,
/// `Gi`, `Ti`) or decimal (`kB`, `MB`, `GB`, `TB`); `B` or none for bytes.
/// Fractions are allowed with a unit (`1.5GiB`).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim());
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "TiB" | "Ti" => 1 << 40,
        "kB" | "KB" | "k" | "K" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        "TB" | "T" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (bytes, or KiB, MiB, GiB, TiB, kB, MB, GB, TB)"
            ))
        }
    };
    let invalid = || format!("{text:?} is not a size (e.g. 8GiB, 512MiB, 1000000)");
    if number.is_empty() {
        return Err(invalid());
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(multiplier)
            .ok_or_else(|| format!("{text:?} is too large"));
    }
    let value: f64 = number.parse().map_err(|_| invalid())?;
    let bytes = (value * multiplier as f64).round();
    if !(bytes.is_finite() && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

/// `bytes` in the largest binary unit it reaches, e.g. "2 GiB", "1.5 MiB".
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn charges_beyond_the_budget_are_refused_and_dropped_ones_give_room_back() {
        let budget = MemoryBudget::new(100);
        let sessions = budget.try_charge(60, Kind::Sessions).unwrap();
        let refused = budget.try_charge(41, Kind::Requests).unwrap_err();
        assert_eq!(
            refused,
            BudgetExhausted {
                kind: Kind::Requests,
                requested: 41,
                charged: 60,
                limit: 100
            }
        );
        let mut replay = budget.empty(Kind::ReplayCaches);
        replay.try_grow(40).unwrap();
        assert!(replay.try_grow(1).is_err());
        assert_eq!(replay.bytes(), 40);
        assert_eq!(budget.charged(), 100);
        assert_eq!(budget.charged_for(Kind::Sessions), 60);
        replay.shrink(30);
        assert_eq!(budget.charged_for(Kind::ReplayCaches), 10);
        drop(sessions);
        drop(replay);
        assert_eq!(budget.charged(), 0);
        assert_eq!(budget.charged_for(Kind::Sessions), 0);
    }

    #[test]
    fn a_charge_anyway_goes_over_the_budget_and_blocks_others_until_dropped() {
        let budget = MemoryBudget::new(100);
        let recovered = budget.charge_anyway(150, Kind::Sessions);
        assert_eq!(budget.charged(), 150);
        assert!(budget.try_charge(1, Kind::Sessions).is_err());
        drop(recovered);
        assert!(budget.try_charge(100, Kind::Sessions).is_ok());
    }

    #[test]
    fn the_refusal_names_the_budget_and_its_flag() {
        let budget = MemoryBudget::new(2 << 30);
        let _held = budget.try_charge(2 << 30, Kind::Sessions).unwrap();
        let text = budget
            .try_charge(2 << 20, Kind::Sessions)
            .unwrap_err()
            .to_string();
        assert_eq!(
            text,
            "memory budget of 2 GiB exhausted: 2 MiB more of session state do not fit beside the 2 GiB charged (--memory-budget)"
        );
    }

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        for (text, bytes) in [
            ("8GiB", 8u64 << 30),
            ("512MiB", 512 << 20),
            ("512Mi", 512 << 20),
            ("1.5GiB", 3 << 29),
            ("1000000", 1_000_000),
            ("2 GB", 2_000_000_000),
            ("64KiB", 65_536),
            ("7B", 7),
        ] {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "GiB",
            "8 parsecs",
            "-1GiB",
            "99999999999TiB",
            "1.2.3MiB",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(100), "100 B");
        assert_eq!(format_bytes(3 << 30), "3 GiB");
    }
}
