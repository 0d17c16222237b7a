//! `--json`: a response message in proto3 JSON, as protobuf's JSON mapping
//! (and grpcurl) prints it: lowerCamelCase field names, enums by name, 64-bit
//! integers as strings, Timestamps in RFC 3339. Fields without presence are
//! printed even at their default value (grpcurl's `-emit-defaults`), so that
//! a script finds every field; unset message and `optional` fields are left
//! out. The names come from the API's descriptors, never from a list here.

use std::io::Write;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde::Serialize;

use crate::proto::FILE_DESCRIPTOR_SET;
use crate::CliError;

/// Prints `message` as pretty proto3 JSON and a newline.
pub fn print<M>(out: &mut impl Write, message: &M) -> Result<(), CliError>
where
    M: prost::Message + prost::Name,
{
    let value = to_dynamic(message)?;
    let options = SerializeOptions::new().skip_default_fields(false);
    let mut serializer = serde_json::Serializer::pretty(&mut *out);
    value
        .serialize_with_options(&mut serializer, &options)
        .map_err(|e| CliError::Output(e.into()))?;
    writeln!(out)?;
    Ok(())
}

/// Prints a JSON value built by a command (for the replies that are not one
/// message), in the same style.
pub fn print_value(out: &mut impl Write, value: &serde_json::Value) -> Result<(), CliError> {
    let mut serializer = serde_json::Serializer::pretty(&mut *out);
    value
        .serialize(&mut serializer)
        .map_err(|e| CliError::Output(e.into()))?;
    writeln!(out)?;
    Ok(())
}

/// `message` re-read through its descriptor. The descriptors are compiled
/// from the same files as the message types, so a failure here is a bug in
/// this program, reported instead of printing something else.
fn to_dynamic<M>(message: &M) -> Result<DynamicMessage, CliError>
where
    M: prost::Message + prost::Name,
{
    let name = M::full_name();
    let pool = DescriptorPool::decode(FILE_DESCRIPTOR_SET)
        .map_err(|e| CliError::Json(format!("the API's descriptors: {e}")))?;
    let descriptor = pool
        .get_message_by_name(&name)
        .ok_or_else(|| CliError::Json(format!("no descriptor for {name}")))?;
    DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|e| CliError::Json(format!("{name}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1 as pb;

    fn json<M: prost::Message + prost::Name>(message: &M) -> serde_json::Value {
        let mut out = Vec::new();
        print(&mut out, message).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn names_are_lower_camel_case_enums_names_and_64_bit_integers_strings() {
        let session = pb::Session {
            session_id: "s".into(),
            version: 3,
            num_batches_tracked: 1 << 40,
            config: Some(pb::SessionConfig {
                kind: pb::BatchNormKind::BatchNorm2d as i32,
                num_features: 4,
                ..Default::default()
            }),
            created_at: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        };
        let value = json(&pb::GetSessionResponse {
            session: Some(session),
        });
        let session = &value["session"];
        assert_eq!(session["sessionId"], "s");
        assert_eq!(session["version"], "3");
        assert_eq!(session["numBatchesTracked"], "1099511627776");
        assert_eq!(session["config"]["kind"], "BATCH_NORM_2D");
        assert_eq!(session["config"]["numFeatures"], "4");
        // Defaults are printed; unset messages are not.
        assert_eq!(session["config"]["affine"], false);
        assert_eq!(session["config"]["paramDtype"], "DATA_TYPE_UNSPECIFIED");
        assert!(session.get("weight").is_none());
        assert_eq!(session["createdAt"], "1970-01-01T00:00:00Z");
    }
}
