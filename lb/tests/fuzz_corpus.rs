//! Replays the minimised fuzzing corpora (`cargo +nightly fuzz run message|tcp_frames`, then
//! `cargo fuzz cmin`) through the same checks as the fuzz targets, on stable, in CI.

use std::path::Path;

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(name);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out
}

#[test]
fn message_corpus() {
    for data in corpus("message") {
        let _ = lb::dataplane::query::check_query(&data);
        let _ = lb::wire::soa_serial(&data);
        if let Ok(q) = lb::wire::question(&data) {
            assert!(q.end <= data.len());
            assert!(lb::wire::answer_matches(&data, Some(&q), &data));
            let _ = lb::wire::qname_hash(&data, &q);
            let mut copy = data.clone();
            let n = lb::wire::make_servfail(&mut copy, Some(&q));
            assert_eq!(lb::wire::header(&copy[..n]).unwrap().rcode, 2);
        }
    }
}

#[test]
fn tcp_frames_corpus() {
    for data in corpus("tcp_frames") {
        let Some((&chunk, stream)) = data.split_first() else {
            continue;
        };
        let mut buf = Vec::new();
        'stream: for piece in stream.chunks((chunk as usize).max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match lb::dataplane::tcp::next_frame(&buf, 16 * 1024) {
                    lb::dataplane::tcp::Frame::Complete(len) => {
                        let _ = lb::dataplane::query::check_query(&buf[2..2 + len]);
                        buf.drain(..2 + len);
                    }
                    lb::dataplane::tcp::Frame::Incomplete => break,
                    lb::dataplane::tcp::Frame::Bad(_) => break 'stream,
                }
            }
        }
    }
}
