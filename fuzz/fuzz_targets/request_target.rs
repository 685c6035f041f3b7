//! Fuzzes the request-target normaliser and the route classifier: any path
//! either is refused or normalises to a path that normalises to itself, has no
//! empty, `.` or `..` segment and no encoded `/`, and classifies without a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use syncgate::keystone::classify;
use syncgate::proxy::target::{check_method, normalise_path};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (method, path) = text.split_once(' ').unwrap_or(("POST", text));
    if check_method(method).is_err() {
        return;
    }
    let Ok(norm) = normalise_path(path) else { return };
    assert!(norm.starts_with('/'));
    assert_eq!(normalise_path(&norm).as_deref(), Ok(norm.as_str()));
    for seg in norm.trim_end_matches('/').split('/').skip(1) {
        assert!(!seg.is_empty() && seg != "." && seg != "..", "{norm}");
    }
    assert!(!norm.to_ascii_uppercase().contains("%2F"));
    let _ = classify(method, &norm);
});
