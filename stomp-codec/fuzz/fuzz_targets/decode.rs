//! `cargo fuzz run decode` (in stomp-codec/): arbitrary bytes into the decoder.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| stomp_codec::fuzz_decode(data));
