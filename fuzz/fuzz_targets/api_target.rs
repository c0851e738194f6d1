//! libFuzzer entry for `servant_tests::fuzz::api_target` (what it checks is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| servant_tests::fuzz::api_target(data));
