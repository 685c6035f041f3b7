//! Fuzzes what comes off the broker: op envelopes and sealed control messages,
//! opened with a fixed key, must open, or be refused, never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use syncgate::protocol::control::Receiver;
use syncgate::protocol::crypto::Sealer;
use syncgate::protocol::messages::{Ack, Envelope, Hello};

const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fuzz_target!(|data: &[u8]| {
    let sealer = Sealer::with_keys(KEY).expect("a valid key");
    if let Ok(env) = serde_json::from_slice::<Envelope>(data) {
        let _ = sealer.open(&Envelope::aad(env.seq), &env.enc, &env.data);
    }
    let receiver = Receiver::default();
    let _ = receiver.open::<Ack>(&sealer, "ack", Some("edge-a"), data);
    let _ = receiver.open::<Hello>(&sealer, "hello", None, data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some((enc, rest)) = text.split_once(':') {
            let _ = sealer.open("a", enc, rest);
        }
    }
});
