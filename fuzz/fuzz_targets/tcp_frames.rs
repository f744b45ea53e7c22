//! TCP frame reassembly as the client path does it: the input is a byte stream (first byte
//! picks the chunk size), frames are taken out as they complete and validated as queries.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else { return };
    let chunk = (chunk as usize).max(1);
    let mut buf = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match lb::dataplane::tcp::next_frame(&buf, 16 * 1024) {
                lb::dataplane::tcp::Frame::Complete(len) => {
                    let _ = lb::dataplane::query::check_query(&buf[2..2 + len]);
                    buf.drain(..2 + len);
                }
                lb::dataplane::tcp::Frame::Incomplete => break,
                lb::dataplane::tcp::Frame::Bad(_) => return,
            }
        }
    }
});
