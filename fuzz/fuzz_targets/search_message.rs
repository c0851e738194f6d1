//! libFuzzer entry for `servant_tests::fuzz::search_message` (what it checks is documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| servant_tests::fuzz::search_message(data));
