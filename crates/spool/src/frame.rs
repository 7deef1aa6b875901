//! The on-disk framing of one spool record.
//!
//! A record is written with a single `write` call as
//!
//! ```text
//! u32 LE  body length
//! u32 LE  CRC32 of (the 4 length bytes ++ body)
//! body:   u64 LE spool sequence
//!         u16 LE subject length, subject (UTF-8)
//!         u16 LE id length, id (UTF-8)
//!         payload (the rest of the body)
//! ```
//!
//! The checksum covers the length as well as the body, so a torn write (a
//! crash in the middle of the write), zeros from a file extended but never
//! written, or garbage after the last record are all told apart from a
//! record: decoding reports why a frame is invalid and never panics or
//! reads past the bytes it was given.

use bytes::Bytes;

/// Bytes before the body: length and checksum.
pub const HEADER_LEN: usize = 8;
/// Smallest body: sequence and the two length fields.
pub const MIN_BODY_LEN: usize = 8 + 2 + 2;

/// One event waiting in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolRecord {
    /// Subject to publish on.
    pub subject: String,
    /// Deterministic message id, sent as `Nats-Msg-Id` on every attempt so
    /// JetStream drops a copy it already stored.
    pub id: String,
    /// Encoded event (for decisions: one batch of many decisions).
    pub payload: Bytes,
}

impl SpoolRecord {
    /// A record for `subject` with message id `id`.
    pub fn new(subject: impl Into<String>, id: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            subject: subject.into(),
            id: id.into(),
            payload: payload.into(),
        }
    }

    /// Size of this record's frame on disk.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + MIN_BODY_LEN + self.subject.len() + self.id.len() + self.payload.len()
    }
}

/// Why a record cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Subject or id longer than a `u16` length can hold.
    #[error("{field} is {len} bytes, at most 65535 fit in a spool record")]
    FieldTooLong {
        /// `subject` or `id`.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The whole frame is larger than a `u32` length can hold.
    #[error("record of {len} bytes does not fit a spool frame")]
    TooLarge {
        /// Frame length.
        len: usize,
    },
}

/// Appends the frame of `record` with sequence `seq` to `out`.
pub fn encode(seq: u64, record: &SpoolRecord, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    for (field, len) in [("subject", record.subject.len()), ("id", record.id.len())] {
        if len > usize::from(u16::MAX) {
            return Err(EncodeError::FieldTooLong { field, len });
        }
    }
    let body_len = record.frame_len() - HEADER_LEN;
    let body_len32 = u32::try_from(body_len).map_err(|_| EncodeError::TooLarge {
        len: record.frame_len(),
    })?;
    let start = out.len();
    out.reserve(record.frame_len());
    out.extend_from_slice(&body_len32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    // Lengths were checked above.
    out.extend_from_slice(&(record.subject.len() as u16).to_le_bytes());
    out.extend_from_slice(record.subject.as_bytes());
    out.extend_from_slice(&(record.id.len() as u16).to_le_bytes());
    out.extend_from_slice(record.id.as_bytes());
    out.extend_from_slice(&record.payload);
    let crc = checksum(&out[start..start + 4], &out[start + HEADER_LEN..]);
    out[start + 4..start + HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn checksum(len: &[u8], body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len);
    hasher.update(body);
    hasher.finalize()
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the frame needs: the end of a torn write.
    #[error("frame truncated: {needed} bytes needed, {available} available")]
    Truncated {
        /// Bytes the frame claims to need.
        needed: usize,
        /// Bytes that are there.
        available: usize,
    },
    /// The length field is impossible (zero-filled or garbage).
    #[error("frame length {len} outside 12..={max}")]
    BadLength {
        /// Length read.
        len: u32,
        /// Largest body allowed.
        max: u32,
    },
    /// The checksum does not match.
    #[error("frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        /// Checksum in the frame.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// Checksum fine but the fields do not parse.
    #[error("frame body malformed: {0}")]
    Malformed(&'static str),
}

/// Reads the header at the start of `bytes`: the body length, checked
/// against `max_body`. Needs [`HEADER_LEN`] bytes.
pub fn body_len(bytes: &[u8], max_body: u32) -> Result<usize, FrameError> {
    if bytes.len() < HEADER_LEN {
        return Err(FrameError::Truncated {
            needed: HEADER_LEN,
            available: bytes.len(),
        });
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if (len as usize) < MIN_BODY_LEN || len > max_body {
        return Err(FrameError::BadLength { len, max: max_body });
    }
    Ok(len as usize)
}

/// Decodes the frame at the start of `bytes` (a body may be at most
/// `max_body` bytes): its sequence, record and total length.
pub fn decode(bytes: &[u8], max_body: u32) -> Result<(u64, SpoolRecord, usize), FrameError> {
    let len = body_len(bytes, max_body)?;
    let total = HEADER_LEN + len;
    if bytes.len() < total {
        return Err(FrameError::Truncated {
            needed: total,
            available: bytes.len(),
        });
    }
    let stored = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let body = &bytes[HEADER_LEN..total];
    let computed = checksum(&bytes[..4], body);
    if stored != computed {
        return Err(FrameError::BadChecksum { stored, computed });
    }
    let mut rest = body;
    let seq = u64::from_le_bytes(
        take(&mut rest, 8)?
            .try_into()
            .map_err(|_| FrameError::Malformed("sequence"))?,
    );
    let subject = take_str(&mut rest, "subject")?;
    let id = take_str(&mut rest, "id")?;
    let record = SpoolRecord {
        subject,
        id,
        payload: Bytes::copy_from_slice(rest),
    };
    Ok((seq, record, total))
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], FrameError> {
    if rest.len() < n {
        return Err(FrameError::Malformed("field runs past the end of the body"));
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn take_str(rest: &mut &[u8], field: &'static str) -> Result<String, FrameError> {
    let len = take(rest, 2)?;
    let len = u16::from_le_bytes([len[0], len[1]]) as usize;
    let bytes = take(rest, len)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        FrameError::Malformed(if field == "subject" {
            "subject is not UTF-8"
        } else {
            "id is not UTF-8"
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 1 << 20;

    fn record(payload: &[u8]) -> SpoolRecord {
        SpoolRecord::new("cnnf.flow.c.n", "n:b:7", payload.to_vec())
    }

    #[test]
    fn round_trip_and_length() {
        let mut buf = Vec::new();
        let r = record(b"hello");
        encode(42, &r, &mut buf).unwrap();
        assert_eq!(buf.len(), r.frame_len());
        encode(43, &record(b""), &mut buf).unwrap();
        let (seq, back, used) = decode(&buf, MAX).unwrap();
        assert_eq!((seq, &back, used), (42, &r, r.frame_len()));
        let (seq, back, _) = decode(&buf[used..], MAX).unwrap();
        assert_eq!((seq, back.payload.len()), (43, 0));
    }

    #[test]
    fn every_truncation_is_detected() {
        let mut buf = Vec::new();
        encode(1, &record(&[7; 300]), &mut buf).unwrap();
        for cut in 0..buf.len() {
            assert!(
                matches!(decode(&buf[..cut], MAX), Err(FrameError::Truncated { .. })),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode(9, &record(b"payload bytes"), &mut buf).unwrap();
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    decode(&bad, MAX).is_err(),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn zeros_and_garbage_are_rejected() {
        assert!(matches!(
            decode(&[0; 64], MAX),
            Err(FrameError::BadLength { len: 0, .. })
        ));
        let garbage: Vec<u8> = (0..200u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        assert!(decode(&garbage, MAX).is_err());
        // A plausible length with a wrong checksum.
        let mut fake = 20u32.to_le_bytes().to_vec();
        fake.extend_from_slice(&[0xab; 24]);
        assert!(matches!(decode(&fake, MAX), Err(FrameError::BadChecksum { .. })));
        // Longer than allowed.
        assert!(matches!(
            decode(&(MAX + 1).to_le_bytes(), MAX),
            Err(FrameError::Truncated { .. })
        ));
        let mut long = (MAX + 1).to_le_bytes().to_vec();
        long.extend_from_slice(&[0; 4]);
        assert!(matches!(decode(&long, MAX), Err(FrameError::BadLength { .. })));
    }

    #[test]
    fn valid_checksum_with_bad_fields_is_malformed_not_a_panic() {
        // Body claims a subject longer than itself; checksum made valid.
        let mut body = 5u64.to_le_bytes().to_vec();
        body.extend_from_slice(&500u16.to_le_bytes());
        body.extend_from_slice(b"abc\0\0");
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        let crc = checksum(&frame, &body);
        frame.extend_from_slice(&crc.to_le_bytes());
        frame.extend_from_slice(&body);
        assert!(matches!(decode(&frame, MAX), Err(FrameError::Malformed(_))));
        // Invalid UTF-8 in the id.
        let mut body = 5u64.to_le_bytes().to_vec();
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(b"s");
        body.extend_from_slice(&2u16.to_le_bytes());
        body.extend_from_slice(&[0xff, 0xfe]);
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        let crc = checksum(&frame, &body);
        frame.extend_from_slice(&crc.to_le_bytes());
        frame.extend_from_slice(&body);
        assert_eq!(decode(&frame, MAX), Err(FrameError::Malformed("id is not UTF-8")));
    }

    #[test]
    fn overlong_fields_are_refused() {
        let long = "x".repeat(70_000);
        let mut buf = Vec::new();
        assert!(matches!(
            encode(1, &SpoolRecord::new(long, "id", Vec::new()), &mut buf),
            Err(EncodeError::FieldTooLong { field: "subject", .. })
        ));
        assert!(buf.is_empty());
    }
}
