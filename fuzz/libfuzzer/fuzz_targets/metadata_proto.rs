#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| magnetar_fuzz::metadata_proto(data));
