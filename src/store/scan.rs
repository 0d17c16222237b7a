//! Session records found in a store file's raw bytes, without redb: every
//! copy of a record framed as [`SessionRecord::encode_record`] writes it
//! (`NSRC`, format, CRC-32 of the payload, payload), wherever it lies.
//!
//! The frame holds no length: the payload is a protobuf message, so its end
//! can only be at a field boundary. The scan walks the fields after the
//! header, and the first boundary where the CRC-32 of the bytes so far
//! matches (and the bytes decode to a record with a valid id) ends the
//! record. A frame whose fields never match is a damaged copy; what its
//! first fields say (id, version) is kept, as a hint of what was lost.
//!
//! A redb file keeps older copies of records in pages it has freed but not
//! yet reused, so a scan finds several copies of a session: the caller
//! chooses (the newest). Only `store check` and `store salvage` use this;
//! the server never serves from a scan.

use crate::session::durable::{SessionRecord, Stamp, RECORD_FORMAT_MAX};
use crate::session::SessionId;

const MAGIC: &[u8; 4] = b"NSRC";
const HEADER_LEN: usize = 12;
/// The record's fields the scan reads from a damaged copy.
const ID_FIELD: u64 = 1;
const VERSION_FIELD: u64 = 20;
const CREATED_AT_FIELD: u64 = 21;

/// One copy of a record found in the bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Copy {
    /// The copy checks: its CRC-32 matches and it decodes.
    Intact {
        offset: usize,
        record: Box<SessionRecord>,
    },
    /// A frame whose checksum never matches: what its fields said before the
    /// damage (either may be wrong if the damage is there).
    Damaged {
        offset: usize,
        id: Option<String>,
        stamp: Option<Stamp>,
    },
}

impl Copy {
    pub fn id(&self) -> Option<&str> {
        match self {
            Copy::Intact { record, .. } => Some(&record.id),
            Copy::Damaged { id, .. } => id.as_deref(),
        }
    }
}

/// Every framed record in `bytes`, in file order.
pub fn scan(bytes: &[u8]) -> Vec<Copy> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(offset) = find(bytes, at) {
        at = offset + 1;
        if let Some((copy, end)) = read_frame(bytes, offset) {
            if matches!(copy, Copy::Intact { .. }) {
                // The bytes of an intact record hold no other copy (`NSRC`
                // inside a record's tensor bytes is a coincidence).
                at = end;
            }
            found.push(copy);
        }
    }
    found
}

fn find(bytes: &[u8], from: usize) -> Option<usize> {
    bytes
        .get(from..)?
        .windows(MAGIC.len())
        .position(|window| window == MAGIC)
        .map(|at| from + at)
}

fn word(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The frame at `offset` and where an intact one ends, or None when it is
/// not one (a format this build never wrote: `NSRC` by coincidence).
fn read_frame(bytes: &[u8], offset: usize) -> Option<(Copy, usize)> {
    let format = word(bytes, offset + 4)?;
    if format == 0 || format > RECORD_FORMAT_MAX {
        return None;
    }
    let crc = word(bytes, offset + 8)?;
    let start = offset + HEADER_LEN;
    let mut hasher = crc32fast::Hasher::new();
    let mut at = start;
    let mut id = None;
    let mut version = None;
    let mut created_at = None;
    while let Some(field) = next_field(bytes, at) {
        hasher.update(&bytes[at..field.end]);
        at = field.end;
        match (field.number, field.value) {
            // The first of each only: past the damage, bytes can look like fields.
            (ID_FIELD, Value::Bytes(text)) if id.is_none() => {
                id = std::str::from_utf8(text).ok().map(str::to_owned);
            }
            (VERSION_FIELD, Value::Varint(v)) if version.is_none() => version = Some(v),
            // int64 as a varint: two's complement in 64 bits.
            (CREATED_AT_FIELD, Value::Varint(v)) if created_at.is_none() => {
                created_at = Some(v as i64);
            }
            _ => {}
        }
        if hasher.clone().finalize() == crc {
            if let Some(record) = decode(&bytes[start..at]) {
                let record = Box::new(record);
                return Some((Copy::Intact { offset, record }, at));
            }
        }
    }
    let damaged = Copy::Damaged {
        offset,
        id,
        stamp: version.map(|version| Stamp {
            incarnation: created_at.unwrap_or(0),
            version,
        }),
    };
    Some((damaged, at))
}

fn decode(payload: &[u8]) -> Option<SessionRecord> {
    let record: SessionRecord = prost::Message::decode(payload).ok()?;
    SessionId::parse_key(&record.id).ok()?;
    Some(record)
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

struct Field<'a> {
    number: u64,
    value: Value<'a>,
    end: usize,
}

/// The protobuf field at `at`, or None when the bytes there are not one.
fn next_field(bytes: &[u8], at: usize) -> Option<Field<'_>> {
    let (tag, at) = varint(bytes, at)?;
    let number = tag >> 3;
    if number == 0 {
        return None;
    }
    let (value, end) = match tag & 7 {
        0 => {
            let (v, end) = varint(bytes, at)?;
            (Value::Varint(v), end)
        }
        1 => (Value::Fixed, at.checked_add(8)?),
        2 => {
            let (len, at) = varint(bytes, at)?;
            let end = at.checked_add(usize::try_from(len).ok()?)?;
            (Value::Bytes(bytes.get(at..end)?), end)
        }
        5 => (Value::Fixed, at.checked_add(4)?),
        _ => return None,
    };
    (end <= bytes.len()).then_some(Field { number, value, end })
}

fn varint(bytes: &[u8], mut at: usize) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(at)?;
        at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some((value, at));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn record(id: &str, version: u64, fill: u8) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            kind: 1,
            num_features: 4,
            param_dtype: 1,
            running_mean: Some(vec![fill; 16]),
            running_var: Some(vec![fill ^ 0x55; 16]),
            num_batches_tracked: version as i64 - 1,
            version,
            created_at_unix_nanos: 1_700_000_000_000_000_000,
            ..Default::default()
        }
    }

    /// Records laid out as a store might: between and around unrelated bytes.
    fn file(records: &[SessionRecord]) -> Vec<u8> {
        let mut bytes = vec![0xAB; 37];
        for record in records {
            bytes.extend_from_slice(&record.encode_record());
            bytes.extend_from_slice(&[0u8, 7, 0xff, 0x12, 0x80, 0x80]);
        }
        bytes
    }

    #[test]
    fn every_intact_copy_is_found_with_its_bytes() {
        let records = [record("a", 2, 1), record("acme/b", 9, 2), record("a", 3, 3)];
        let found = scan(&file(&records));
        let intact: Vec<_> = found
            .iter()
            .map(|copy| match copy {
                Copy::Intact { record, .. } => SessionRecord::clone(record),
                Copy::Damaged { .. } => panic!("{copy:?}"),
            })
            .collect();
        assert_eq!(intact, records);
    }

    #[test]
    fn a_flipped_byte_makes_a_damaged_copy_that_still_names_its_session() {
        let records = [record("victim", 5, 9), record("kept", 2, 4)];
        let mut bytes = file(&records);
        let frame = find(&bytes, 0).unwrap();
        // Inside running_mean's bytes, after the id and before the version.
        let at = frame
            + bytes[frame..]
                .windows(16)
                .position(|w| w == [9u8; 16])
                .unwrap()
            + 3;
        bytes[at] ^= 0x10;
        let found = scan(&bytes);
        assert_eq!(found.len(), 2, "{found:?}");
        match &found[0] {
            Copy::Damaged { id, stamp, .. } => {
                assert_eq!(id.as_deref(), Some("victim"));
                assert_eq!(stamp.map(|s| s.version), Some(5));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&found[1], Copy::Intact { record, .. } if **record == records[1]));
    }

    #[test]
    fn a_truncated_copy_is_damaged_and_a_foreign_magic_is_ignored() {
        let bytes = record("cut", 4, 6).encode_record();
        let found = scan(&bytes[..bytes.len() - 3]);
        assert!(matches!(&found[..], [Copy::Damaged { id: Some(id), .. }] if id == "cut"));
        assert!(scan(b"xxNSRC\x09\x00\x00\x00abcd").is_empty());
        assert!(scan(b"NSRC\x01\x00").is_empty());
    }
}
