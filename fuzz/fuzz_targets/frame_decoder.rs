//! Bytes from a command-socket client: reassembled into frames, decoded as requests, applied to
//! a state. Nothing here may panic, hang or allocate beyond the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart_command::framing::{FrameReader, decode_request};
use rampart_command::state::State;

fuzz_target!(|data: &[u8]| {
    let mut reader = FrameReader::new(64 * 1024);
    let mut input = data;
    let mut state = State::new();
    // Each frame is at least one byte, so this loop ends.
    while let Ok(Some(body)) = reader.read_frame(&mut input) {
        if let Ok(request) = decode_request(&body) {
            let before = state.clone();
            if state.apply(&request).is_err() {
                assert!(state == before, "a refused request changed the state");
            }
        }
    }
});
