//! The spool's stored bytes: `record::decode`, `decode_part`, `stored`, `decode_file`,
//! `key_seq`, on the input as it is and on the input as the body of a record whose header
//! (magic, version, CRC-32C, length) is right, so that the body decoder is reached.
//!
//! Checks: never a panic (every damage is a `FormatError`); what decodes re-encodes into
//! bytes that decode to the same record and frame part; `decode` is `decode_part`'s record;
//! a record file decodes as its inline bytes do when its stub matches, and is refused when it
//! does not; a stub is 11 bytes and encodes back to itself; a key is a seq iff it is 8 bytes.
#![no_main]

use fovea::spool::record::{
    self, FileStub, FormatError, HEADER_LEN, MAGIC, Stored, VERSION, decode, decode_file,
    decode_part, encode_part, key_seq, seq_key, stored,
};
use fovea_fuzz as _;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut framed = MAGIC.to_vec();
    framed.push(VERSION);
    framed.extend(crc32c::crc32c(data).to_le_bytes());
    framed.extend((data.len() as u32).to_le_bytes());
    framed.extend(data);
    check(&framed);

    match key_seq(data) {
        Ok(seq) => assert_eq!(&seq_key(seq)[..], data),
        Err(e) => assert!(data.len() != 8 && matches!(e, FormatError::Key(_))),
    }
});

fn check(bytes: &[u8]) {
    let decoded = decode_part(bytes);
    assert_eq!(decode(bytes), decoded.clone().map(|(rec, _)| rec));
    match &decoded {
        Ok((rec, part)) => {
            let again = encode_part(rec, *part).expect("a decoded record encodes");
            assert_eq!(decode_part(&again).as_ref(), Ok(&(rec.clone(), *part)));
            if let Some(part) = part {
                assert!(part.count > 0 && rec.class == record::Class::Frame);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    match stored(bytes) {
        Ok(Stored::Inline(inline)) => assert_eq!(inline, bytes),
        Ok(Stored::File(stub)) => {
            assert_eq!(bytes.len(), HEADER_LEN);
            assert_eq!(&stub.encode()[..], bytes);
        }
        Err(e) => assert!(bytes.starts_with(b"FL"), "{e}"),
    }
    let stub = FileStub::of(bytes);
    assert_eq!(decode_file(stub, "f", bytes), decoded);
    let other = FileStub {
        crc: stub.crc ^ 1,
        ..stub
    };
    assert!(matches!(
        decode_file(other, "f", bytes),
        Err(FormatError::FileMismatch { .. })
    ));
}
