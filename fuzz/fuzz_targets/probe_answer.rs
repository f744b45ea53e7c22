//! The health probe's verdict on arbitrary answers to a fixed SOA query.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let q = lb::wire::build_query(0x1234, b"\x07example\x04test\x00", 6);
    let _ = lb::probe::check_answer(&q, data, Some(5));
    let mut answer = data.to_vec();
    if answer.len() >= 2 {
        answer[..2].copy_from_slice(&q[..2]);
        let _ = lb::probe::check_answer(&q, &answer, None);
    }
});
