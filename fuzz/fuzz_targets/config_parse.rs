//! Arbitrary text through the config parser and compiler: errors, never panics.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = gateway_core::config::Config::parse(text) {
            let _ = gateway_core::Gateway::new(&config);
        }
    }
});
