//! Configuration files: any text either parses into a valid state or gives a located error.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rampart_command::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = Config::parse(text, Path::new("/nonexistent/fuzz.toml")) {
            let _ = config.check();
        }
    }
});
