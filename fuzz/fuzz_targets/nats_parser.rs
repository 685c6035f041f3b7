//! Fuzzes the broker's protocol parser: any bytes, fed whole, must parse to
//! operations, an error or `Incomplete`, never a panic, and never consume more
//! than it was given.

#![no_main]

use libfuzzer_sys::fuzz_target;
use syncgate::broker::parser::{parse, Limits, Parsed};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_control_line: 512, max_payload: 4096 };
    let mut at = 0;
    while at < data.len() {
        match parse(&data[at..], &limits) {
            Ok(Parsed::Op(_, used)) => {
                assert!(used > 0 && at + used <= data.len());
                at += used;
            }
            Ok(Parsed::Incomplete) => {
                assert!(data.len() - at <= limits.max_control_line + limits.max_payload + 4);
                break;
            }
            Err(_) => break,
        }
    }
});
