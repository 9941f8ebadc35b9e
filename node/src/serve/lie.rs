//! For the tests of the coordinator's checks only (`--test-lie`): the error a lying or
//! broken node adds to its outputs.

use llm::stage::RowsOutput;

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
