//! Frames as they are written and read: every kind round-trips, bad lengths are refused.

use super::*;

#[test]
fn frames_round_trip_and_bad_lengths_are_refused() {
    let s = Sampling {
        temperature: 0.5,
        top_p: 0.9,
        seed: 7,
    };
    let group = |seq, pos0, rows| Group {
        seq,
        pos0,
        rows,
        sample: true,
        sampling: s,
    };
    let hidden_step = Frame::Step {
        step: 4,
        in_flight: 2,
        busy_us: vec![1500, 20],
        groups: vec![group(0, 3, 1), group(2, 0, 1)],
        payload: Payload::Hidden {
            n_embd: 2,
            data: vec![1.0, 2.0, 3.0, 4.0],
        },
    };
    for f in [
        Frame::Hello(Hello {
            model_sha256: "m".into(),
            split_id: "s".into(),
            stage: 2,
            nonce: "ab".into(),
            kind: LaneKind::Probe,
        }),
        Frame::Hello(Hello {
            model_sha256: "m".into(),
            split_id: "s".into(),
            stage: 3,
            nonce: "cd".into(),
            kind: LaneKind::Answers {
                lane: "0f1e".into(),
            },
        }),
        Frame::Output {
            step: 5,
            width: 2,
            data: vec![0.5, -1.0, 2.0, 3.0],
        },
        Frame::Challenge {
            nonce: [1; auth::PROOF_LEN],
            proof: [2; auth::PROOF_LEN],
        },
        Frame::Proof([3; auth::PROOF_LEN]),
        Frame::Ready,
        Frame::Step {
            step: 1,
            in_flight: 1,
            busy_us: vec![],
            groups: vec![group(1, 3, 3)],
            payload: Payload::Tokens(vec![1, -2, 3]),
        },
        hidden_step.clone(),
        Frame::Sampled {
            step: 9,
            tokens: vec![(0, 42), (3, -1)],
            busy_us: vec![10, 20],
        },
        Frame::Signed {
            signature: [5; SIGNATURE_LEN],
            step: Box::new(hidden_step.clone()),
        },
        Frame::Recall {
            lane: "0f1e".into(),
            seq: 3,
            first: 10,
            last: 20,
        },
        Frame::Recalled(vec![vec![1, 2, 3], vec![]]),
        Frame::Error("no".into()),
    ] {
        assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
    }
    let mut bad = hidden_step.encode();
    bad.truncate(bad.len() - 1);
    assert!(Frame::decode(&bad).is_err());
    // Groups that claim more rows than the payload carries.
    let lying = Frame::Step {
        step: 1,
        in_flight: 1,
        busy_us: vec![],
        groups: vec![group(0, 0, 4)],
        payload: Payload::Tokens(vec![1, 2, 3]),
    };
    assert!(matches!(
        Frame::decode(&lying.encode()),
        Err(FrameError::Rows {
            groups: 4,
            payload: 3
        })
    ));
    // A count far beyond the bytes that follow is refused before anything is allocated.
    let mut huge = vec![7u8];
    huge.extend(1u64.to_le_bytes());
    huge.extend(u32::MAX.to_le_bytes());
    assert!(matches!(Frame::decode(&huge), Err(FrameError::TooMany(_))));
    assert!(Frame::decode(&[9]).is_err());
    // Only a Step is signed.
    let mut signed_ready = vec![9u8];
    signed_ready.extend([0; SIGNATURE_LEN]);
    signed_ready.push(2);
    assert!(matches!(
        Frame::decode(&signed_ready),
        Err(FrameError::Signed(2))
    ));
    assert!(Frame::decode(&[]).is_err());
}
