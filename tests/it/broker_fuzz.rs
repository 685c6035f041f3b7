//! Property tests of the protocol parser: arbitrary bytes never panic it and
//! never make it wait on more than one bounded operation; valid operations cut
//! at arbitrary points parse back to themselves.

use proptest::prelude::*;
use syncgate::broker::parser::{parse, Limits, Op, Parsed};

const LIMITS: Limits = Limits {
    max_control_line: 256,
    max_payload: 512,
};

/// Parses all complete operations; returns them (as debug text) and the bytes left.
fn parse_all(buf: &[u8]) -> Result<(Vec<String>, usize), ()> {
    let mut at = 0;
    let mut ops = Vec::new();
    while at < buf.len() {
        match parse(&buf[at..], &LIMITS) {
            Ok(Parsed::Op(op, used)) => {
                assert!(
                    used > 0 && at + used <= buf.len(),
                    "consumed {used} of {}",
                    buf.len() - at
                );
                ops.push(format!("{op:?}"));
                at += used;
            }
            Ok(Parsed::Incomplete) => {
                // Waiting is bounded: one control line and one maximal payload.
                let waiting = buf.len() - at;
                assert!(
                    waiting <= LIMITS.max_control_line + LIMITS.max_payload + 4,
                    "waiting on {waiting} bytes"
                );
                break;
            }
            Err(_) => return Err(()),
        }
    }
    Ok((ops, buf.len() - at))
}

fn op_strategy() -> impl Strategy<Value = Vec<u8>> {
    let token = "[a-zA-Z0-9_]{1,8}";
    let subject = proptest::collection::vec(token, 1..4).prop_map(|t| t.join("."));
    prop_oneof![
        Just(b"PING\r\n".to_vec()),
        Just(b"PONG\r\n".to_vec()),
        (subject.clone(), token, 0u32..1000)
            .prop_map(|(s, sid, _)| format!("SUB {s} {sid}\r\n").into_bytes()),
        (token, proptest::option::of(1u32..100)).prop_map(|(sid, max)| match max {
            Some(m) => format!("UNSUB {sid} {m}\r\n").into_bytes(),
            None => format!("UNSUB {sid}\r\n").into_bytes(),
        }),
        (
            subject.clone(),
            proptest::option::of(subject.clone()),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(s, reply, payload)| {
                let mut v = match reply {
                    Some(r) => format!("PUB {s} {r} {}\r\n", payload.len()).into_bytes(),
                    None => format!("PUB {s} {}\r\n", payload.len()).into_bytes(),
                };
                v.extend_from_slice(&payload);
                v.extend_from_slice(b"\r\n");
                v
            }),
        (subject, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(s, payload)| {
            let headers = b"NATS/1.0\r\nK: v\r\n\r\n";
            let mut v = format!(
                "HPUB {s} {} {}\r\n",
                headers.len(),
                headers.len() + payload.len()
            )
            .into_bytes();
            v.extend_from_slice(headers);
            v.extend_from_slice(&payload);
            v.extend_from_slice(b"\r\n");
            v
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_all(&bytes);
    }

    #[test]
    fn arbitrary_bytes_after_a_verb_never_panic(
        verb in prop_oneof![Just("PUB "), Just("HPUB "), Just("SUB "), Just("UNSUB "), Just("CONNECT ")],
        bytes in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut input = verb.as_bytes().to_vec();
        input.extend_from_slice(&bytes);
        let _ = parse_all(&input);
    }

    #[test]
    fn valid_operations_survive_any_split(ops in proptest::collection::vec(op_strategy(), 1..12), cut in any::<prop::sample::Index>()) {
        let stream: Vec<u8> = ops.concat();
        let (whole, left) = parse_all(&stream).expect("valid stream");
        prop_assert_eq!(left, 0);
        prop_assert_eq!(whole.len(), ops.len());
        // Feed in two reads, as a socket might: the first yields a prefix of the
        // operations, and the rest parses to the remainder.
        let at = cut.index(stream.len() + 1);
        let (first, left) = parse_all(&stream[..at]).expect("a prefix is never an error");
        let (second, rest) = parse_all(&stream[at - left..]).expect("the rest parses");
        prop_assert_eq!(rest, 0);
        prop_assert_eq!([first, second].concat(), whole);
    }
}

#[test]
fn ops_carry_their_bytes() {
    let Ok(Parsed::Op(Op::Pub { payload, .. }, _)) = parse(b"PUB a 3\r\n\x00\xff\r\r\n", &LIMITS)
    else {
        panic!("PUB with binary payload");
    };
    assert_eq!(payload, b"\x00\xff\r");
}
