//! The segment reader never panics, whatever the bytes: parsing, the quick header/commit
//! reader, and iterating the records all return errors instead.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tidemark::segment::{read_info, Segment};

fuzz_target!(|data: &[u8]| {
    let _ = read_info(data);
    if let Ok(seg) = Segment::parse(Bytes::copy_from_slice(data)) {
        let _ = seg.verify();
        for rec in seg.records() {
            if rec.is_err() {
                break;
            }
        }
    }
});
