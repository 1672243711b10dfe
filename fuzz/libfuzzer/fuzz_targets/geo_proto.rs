#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| magnetar_fuzz::geo_proto(data));
