//! Control-protocol decoding of arbitrary request lines (and responses, which `lb ctl` and the
//! deployer decode), plus re-encoding of whatever decodes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lb::control_protocol::{ControlRequest, ControlResponse};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<ControlRequest>(data) {
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<ControlRequest>(&s).unwrap(), r);
    }
    let _ = serde_json::from_slice::<ControlResponse>(data);
});
