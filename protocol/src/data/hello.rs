//! The greeting of a data connection: what the caller wants to reach (model, split, stage),
//! its nonce, and what the connection is for ([`LaneKind`]), as it is read and written. The
//! route key's proofs ([`super::auth`]) cover these exact bytes.

use serde::{Deserialize, Serialize};

/// The greeting of a data connection. On the wire its kind is three fields (`probe`,
/// `answers`, `lane`); a combination of them that means nothing is refused when the frame is
/// read, so no one past the reader can be handed one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "HelloWire", into = "HelloWire")]
pub struct Hello {
    pub model_sha256: String,
    pub split_id: String,
    /// The stage (shard id) the caller wants to talk to.
    pub stage: u32,
    /// The caller's fresh random nonce (hex), which the callee's proof covers.
    pub nonce: String,
    /// What the connection is for.
    pub kind: LaneKind,
}

/// What a data connection is for: one kind per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneKind {
    /// A lane of the pipeline: steps go down the route. `lane` is the coordinator's lane id,
    /// passed down the chain, with which the last stage finds the lane's answer lane; empty
    /// from a caller that opens none (a one-stage route answers on its only lane).
    Chain { lane: String },
    /// The answer lane `lane` to the last stage: it carries that chain lane's `Sampled`
    /// answers back to the coordinator and nothing the other way.
    Answers { lane: String },
    /// The coordinator checking this node's stage: each step is answered with the stage's own
    /// output (`Output`), nothing goes on to a next stage, and steps use only the sequence kept
    /// for probes. Proved with the node's probe key, not a hop key.
    Probe,
}

/// [`Hello`] as it travels (the proofs cover these exact bytes).
#[derive(Serialize, Deserialize)]
struct HelloWire {
    model_sha256: String,
    split_id: String,
    stage: u32,
    nonce: String,
    #[serde(default)]
    probe: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    lane: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    answers: bool,
}

impl TryFrom<HelloWire> for Hello {
    type Error = String;

    fn try_from(w: HelloWire) -> Result<Hello, String> {
        let kind = match (w.probe, w.answers, w.lane) {
            (false, false, lane) => LaneKind::Chain { lane },
            (false, true, lane) if !lane.is_empty() => LaneKind::Answers { lane },
            (false, true, _) => return Err("an answer lane names the lane it answers".into()),
            (true, false, lane) if lane.is_empty() => LaneKind::Probe,
            (true, false, _) => return Err("a probe belongs to no lane".into()),
            (true, true, _) => {
                return Err("a connection is a probe or an answer lane, not both".into())
            }
        };
        Ok(Hello {
            model_sha256: w.model_sha256,
            split_id: w.split_id,
            stage: w.stage,
            nonce: w.nonce,
            kind,
        })
    }
}

impl From<Hello> for HelloWire {
    fn from(h: Hello) -> HelloWire {
        let (probe, answers, lane) = match h.kind {
            LaneKind::Chain { lane } => (false, false, lane),
            LaneKind::Answers { lane } => (false, true, lane),
            LaneKind::Probe => (true, false, String::new()),
        };
        HelloWire {
            model_sha256: h.model_sha256,
            split_id: h.split_id,
            stage: h.stage,
            nonce: h.nonce,
            probe,
            lane,
            answers,
        }
    }
}

impl Hello {
    pub fn is_probe(&self) -> bool {
        self.kind == LaneKind::Probe
    }
}

#[cfg(feature = "io")]
impl Hello {
    /// A greeting for `stage` of a split, with a fresh nonce: a chain lane with no id.
    pub fn new(model_sha256: &str, split_id: &str, stage: u32) -> Hello {
        Hello {
            model_sha256: model_sha256.to_owned(),
            split_id: split_id.to_owned(),
            stage,
            nonce: super::io::random_bytes::<16>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            kind: LaneKind::Chain {
                lane: String::new(),
            },
        }
    }

    /// This greeting as the chain lane `lane` (a chain hop passes the coordinator's id on).
    pub fn on_lane(self, lane: &str) -> Hello {
        Hello {
            kind: LaneKind::Chain {
                lane: lane.to_owned(),
            },
            ..self
        }
    }

    /// A greeting for the answer lane `lane` to the last stage, `stage` ([`LaneKind::Answers`]).
    pub fn answers(model_sha256: &str, split_id: &str, stage: u32, lane: &str) -> Hello {
        Hello {
            kind: LaneKind::Answers {
                lane: lane.to_owned(),
            },
            ..Hello::new(model_sha256, split_id, stage)
        }
    }

    /// A greeting for a probe lane to `stage` ([`LaneKind::Probe`]).
    pub fn probe(model_sha256: &str, split_id: &str, stage: u32) -> Hello {
        Hello {
            kind: LaneKind::Probe,
            ..Hello::new(model_sha256, split_id, stage)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_reads_as_one_kind_of_lane_and_keeps_its_wire_bytes() {
        let read = |fields: &str| {
            serde_json::from_str::<Hello>(&format!(
                r#"{{"model_sha256":"m","split_id":"s","stage":1,"nonce":"n"{fields}}}"#
            ))
        };
        let chain = |lane: &str| LaneKind::Chain { lane: lane.into() };
        // Older callers send no kind fields: a chain lane without an id.
        assert_eq!(read("").unwrap().kind, chain(""));
        assert_eq!(read(r#","lane":"l1""#).unwrap().kind, chain("l1"));
        assert_eq!(read(r#","probe":true"#).unwrap().kind, LaneKind::Probe);
        assert_eq!(
            read(r#","answers":true,"lane":"l1""#).unwrap().kind,
            LaneKind::Answers { lane: "l1".into() }
        );
        for bad in [
            r#","answers":true"#,
            r#","answers":true,"lane":"l1","probe":true"#,
            r#","probe":true,"lane":"l1""#,
        ] {
            assert!(read(bad).is_err(), "{bad} was read");
        }
        // Written back exactly as the fields were (the route key's proofs cover the bytes).
        for fields in [
            "",
            r#","lane":"l1""#,
            r#","probe":true"#,
            r#","lane":"l1","answers":true"#,
        ] {
            let text = format!(r#"{{"model_sha256":"m","split_id":"s","stage":1,"nonce":"n","probe":false{fields}}}"#)
                .replace(r#""probe":false,"probe":true"#, r#""probe":true"#);
            let hello: Hello = serde_json::from_str(&text).unwrap();
            assert_eq!(serde_json::to_string(&hello).unwrap(), text);
        }
    }
}
