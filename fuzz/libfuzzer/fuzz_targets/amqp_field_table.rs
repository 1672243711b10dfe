#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| magnetar_fuzz::amqp_field_table(data));
