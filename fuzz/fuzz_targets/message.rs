//! Every function that reads a DNS message from the network: query validation, question
//! parsing, answer matching against the message itself and a case-changed copy, the qname
//! hash, SERVFAIL synthesis and the SOA serial reader.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = lb::dataplane::query::check_query(data);
    let _ = lb::wire::soa_serial(data);
    if let Ok(q) = lb::wire::question(data) {
        assert!(q.end <= data.len());
        assert!(lb::wire::answer_matches(data, Some(&q), data));
        let _ = lb::wire::qname_hash(data, &q);
        let mut upper = data.to_vec();
        upper[q.name_start..q.name_end].make_ascii_uppercase();
        let _ = lb::wire::answer_matches(data, Some(&q), &upper);
        let mut copy = data.to_vec();
        let n = lb::wire::make_servfail(&mut copy, Some(&q));
        assert_eq!(lb::wire::header(&copy[..n]).unwrap().rcode, 2);
        lb::wire::set_id(&mut copy, 0xabcd);
        assert_eq!(lb::wire::id(&copy), 0xabcd);
    }
});
