//! For the tests of the coordinator's defences only: how a hostile node misbehaves. An
//! honest node (the default) does none of it.

use llm::stage::RowsOutput;
use protocol::data::Frame;

/// What this node does wrong, on purpose (hidden flags `--test-lie`, `--test-attack`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Hostility {
    /// Scale of the error it adds to every output it computes (0: none).
    pub lie: f32,
    pub attack: Option<Attack>,
}

/// A protocol attack (`--test-attack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attack {
    /// As the last stage, answer every sampled token with an id outside any vocabulary.
    BadToken,
    /// Corrupt every output on the route's lanes (what is served), and answer the
    /// coordinator's probes honestly: a liar that knows probes from served traffic.
    LieOnLanes,
    /// Refuse the coordinator's recall of the signed steps this stage received.
    RefuseChecks,
}

/// How much [`Attack::LieOnLanes`] corrupts (times each output's RMS): enough to change
/// tokens.
const LANE_LIE: f32 = 0.5;

impl Hostility {
    /// Say what this node will do wrong, so that nobody runs it by mistake unnoticed.
    pub fn announce(&self) {
        if self.lie != 0.0 {
            tracing::warn!(
                "--test-lie {}: this node corrupts every output it computes",
                self.lie
            );
        }
        if let Some(attack) = self.attack {
            tracing::warn!("--test-attack {attack:?}: this node breaks the protocol on purpose");
        }
    }

    /// The error this node adds to an output it computed on a probe lane (`probe`) or a lane
    /// of the route.
    pub(super) fn lie_on(&self, probe: bool) -> f32 {
        match self.attack {
            Some(Attack::LieOnLanes) if !probe => LANE_LIE,
            _ => self.lie,
        }
    }

    /// Whether this node refuses the coordinator's recalls.
    pub(super) fn refuses_checks(&self) -> bool {
        self.attack == Some(Attack::RefuseChecks)
    }

    /// The last stage's answer as this node sends it.
    pub(super) fn answer(&self, mut frame: Frame) -> Frame {
        if self.attack == Some(Attack::BadToken) {
            if let Frame::Sampled { tokens, .. } = &mut frame {
                for (_, token) in tokens {
                    *token = i32::MAX;
                }
            }
        }
        frame
    }
}

/// Test only (`--test-lie`): add an error of about `scale` times each output's RMS, as a node
/// that computes wrongly (or lies) would.
pub(super) fn corrupt(output: &mut RowsOutput, scale: f32) {
    let values: Vec<&mut [f32]> = match output {
        RowsOutput::Hidden(data) => vec![data.as_mut_slice()],
        RowsOutput::Logits(rows) => rows.iter_mut().map(|(_, l)| l.as_mut_slice()).collect(),
    };
    for v in values {
        let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len().max(1) as f32).sqrt();
        for (i, x) in v.iter_mut().enumerate() {
            *x += scale * rms * ((i as f32) * 0.7).sin();
        }
    }
}
