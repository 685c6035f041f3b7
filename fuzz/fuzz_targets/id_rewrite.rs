//! Fuzzes the ID rewriter and the entity keys of a write: any JSON body and
//! path are rewritten without a panic, a mapped ID never survives, and the keys
//! a write touches are sorted and unique.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use syncgate::keystone::ids::{rewrite_body, rewrite_path};
use syncgate::keystone::touches::touches;
use syncgate::keystone::{classify, Classification};

const FROM: &str = "0123456789abcdef0123456789abcdef";
const TO: &str = "fedcba9876543210fedcba9876543210";

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let Ok(path) = std::str::from_utf8(&data[..split]) else { return };
    let map = |id: &str| (id == FROM).then(|| TO.to_string());
    let rewritten = rewrite_path(path, &map);
    let before = path.split('?').next().unwrap_or("");
    let after = rewritten.split('?').next().unwrap_or("");
    assert!(!after.split('/').any(|s| s == FROM) || !before.split('/').any(|s| s == FROM));
    let mut body: Option<Value> = serde_json::from_slice(&data[split.min(data.len())..]).ok();
    if let Some(b) = body.as_mut() {
        rewrite_body(b, &map);
        assert!(!b.to_string().contains(&format!("\"{FROM}\"")));
    }
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        if let Classification::Replicable(route) = classify(method, before) {
            let t = touches(&route, method, path, body.as_ref());
            assert!(t.windows(2).all(|w| w[0].key < w[1].key));
        }
    }
});
