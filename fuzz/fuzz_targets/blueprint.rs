//! The blueprint loader must never panic, whatever bytes it is given.
//!
//!     cargo fuzz run blueprint
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = commons_blueprint::load_str(Path::new("/fuzz/commons.yaml"), text);
        let _ = commons_blueprint::Template::parse(text);
    }
});
