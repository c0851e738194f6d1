//! libFuzzer entry for `servant_tests::fuzz::config_toml` (what it checks is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| servant_tests::fuzz::config_toml(data));
