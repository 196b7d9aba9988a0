//! The two logical message formats (specified in `proto/messages.md`): `tidemark.ddl`, one
//! top-level query that changed the schema, and `tidemark.sequences`, the sequences whose value
//! changed since the last one; and their decoding, which refuses a newer format version.

use serde::{Deserialize, Serialize};

/// Prefix of the DDL messages.
pub const DDL_PREFIX: &str = "tidemark.ddl";
/// Prefix of the sequence-value messages.
pub const SEQUENCES_PREFIX: &str = "tidemark.sequences";
/// Version of the message formats this build writes (and the highest it reads).
pub const MESSAGE_VERSION: u32 = 1;

/// A `tidemark.ddl` message: one top-level query that changed the schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlMessage {
    pub v: u32,
    /// The client's whole query string (may hold several statements, DML too).
    pub query: String,
    /// Command tag of the first DDL command of the query.
    #[serde(default)]
    pub tag: String,
    /// The schemas of the search path in effect, in order (`current_schemas(false)`).
    #[serde(default)]
    pub search_path: Vec<String>,
    /// The role that ran it (informational).
    #[serde(default)]
    pub role: String,
}

/// One sequence's value in a `tidemark.sequences` message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceValue {
    pub schema: String,
    pub name: String,
    pub last_value: i64,
    pub is_called: bool,
}

/// A `tidemark.sequences` message: the sequences whose value changed since the last one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequencesMessage {
    pub v: u32,
    pub sequences: Vec<SequenceValue>,
}

/// A tidemark logical message, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TidemarkMessage {
    Ddl(DdlMessage),
    Sequences(SequencesMessage),
}

/// Why a tidemark message cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("logical message {prefix:?} is not valid: {detail}")]
    Invalid { prefix: String, detail: String },
    #[error("logical message {prefix:?} has format version {v}, newer than this tidemark reads ({MESSAGE_VERSION})\nHINT: restore with a newer tidemark")]
    TooNew { prefix: String, v: u32 },
}

/// Decodes a logical message of tidemark's; `Ok(None)` for any other prefix (heartbeats, other
/// applications' messages).
pub fn decode_message(
    prefix: &str,
    content: &[u8],
) -> Result<Option<TidemarkMessage>, MessageError> {
    let invalid = |e: serde_json::Error| MessageError::Invalid {
        prefix: prefix.to_string(),
        detail: e.to_string(),
    };
    let msg = match prefix {
        DDL_PREFIX => {
            let m: DdlMessage = serde_json::from_slice(content).map_err(invalid)?;
            check_version(prefix, m.v)?;
            TidemarkMessage::Ddl(m)
        }
        SEQUENCES_PREFIX => {
            let m: SequencesMessage = serde_json::from_slice(content).map_err(invalid)?;
            check_version(prefix, m.v)?;
            TidemarkMessage::Sequences(m)
        }
        _ => return Ok(None),
    };
    Ok(Some(msg))
}

fn check_version(prefix: &str, v: u32) -> Result<(), MessageError> {
    if v > MESSAGE_VERSION || v == 0 {
        return Err(MessageError::TooNew {
            prefix: prefix.to_string(),
            v,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_messages_and_refuses_newer_versions() {
        let m = decode_message(DDL_PREFIX, br#"{"v":1,"query":"DROP TABLE t","tag":"DROP TABLE","search_path":["public"],"role":"x"}"#)
            .unwrap()
            .unwrap();
        assert!(matches!(m, TidemarkMessage::Ddl(d) if d.query == "DROP TABLE t"));
        assert!(decode_message("tidemark.heartbeat", b"").unwrap().is_none());
        assert!(matches!(
            decode_message(SEQUENCES_PREFIX, br#"{"v":2,"sequences":[]}"#),
            Err(MessageError::TooNew { .. })
        ));
        assert!(decode_message(DDL_PREFIX, b"not json").is_err());
    }
}
