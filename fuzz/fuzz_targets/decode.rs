//! The pgoutput decoder never panics, whatever the bytes; what it accepts re-encodes to the
//! same bytes.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tidemark::pgoutput::{decode, encode};

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the context (inside a streamed transaction or not).
    let Some((&ctx, rest)) = data.split_first() else {
        return;
    };
    let payload = Bytes::copy_from_slice(rest);
    if let Ok(msg) = decode(&payload, ctx & 1 == 1) {
        let mut out = BytesMut::new();
        encode(&msg, &mut out);
        assert_eq!(out.freeze(), payload, "decoded {msg:?}");
    }
});
