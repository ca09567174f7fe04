//! Arbitrary manifest text (YAML or JSON, any kinds) through the Kubernetes translation and
//! the gateway's compiler: problems reported, never a panic.
#![no_main]

use gateway_k8s::objects::Objects;
use gateway_k8s::translate::{Options, translate};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut objects = Objects::default();
    let _problems = objects.add_manifest("fuzz.yaml", text);
    let translation = translate(&objects, &Options::default());
    let _ = gateway_core::Gateway::builder().plugins(gateway_plugins::registry()).build(&translation.config);
});
