#![no_main]

// The Arrow IPC reader asserts (panics) on some malformed buffer layouts,
// and `magnetar_tiering::format` turns those panics into `Corrupt` errors
// with `catch_unwind`, as the broker relies on. libfuzzer-sys's panic hook
// aborts on every panic, caught or not; this one leaves caught panics
// alone, and an uncaught one still aborts, in libfuzzer-sys's wrapper.
libfuzzer_sys::fuzz_target!(
    init: {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_arrow = info.location().is_some_and(|l| l.file().contains("/arrow-"));
            if !in_arrow {
                report(info);
            }
        }));
    },
    |data: &[u8]| magnetar_fuzz::tier_file(data)
);
