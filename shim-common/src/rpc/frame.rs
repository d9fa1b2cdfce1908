//! ttrpc framing: a 10-byte big-endian header (payload length, stream id, type, flags)
//! followed by the payload.

use std::io::{self, Write};

use ttrpc::proto::{MESSAGE_HEADER_LENGTH, MESSAGE_LENGTH_MAX};
use ttrpc::MessageHeader;

pub(crate) const HEADER_LEN: usize = MESSAGE_HEADER_LENGTH;
/// ttrpc's limit on a payload; larger frames are a protocol error.
pub(crate) const MAX_PAYLOAD: usize = MESSAGE_LENGTH_MAX;

/// Header and payload in one buffer, so one `write` puts the whole frame on the wire.
pub(crate) fn encode(stream_id: u32, type_: u8, payload: &[u8]) -> Vec<u8> {
    let mh = MessageHeader {
        length: payload.len() as u32,
        stream_id,
        type_,
        flags: 0,
    };
    let mut buf: Vec<u8> = mh.into();
    buf.extend_from_slice(payload);
    buf
}

/// Writes one frame; `w` must be exclusively held for the duration (frames must not interleave).
pub(crate) fn write(
    mut w: impl Write,
    stream_id: u32,
    type_: u8,
    payload: &[u8],
) -> io::Result<()> {
    w.write_all(&encode(stream_id, type_, payload))
}

/// Reads one frame (blocking). Tests only: the server and the client read what is there
/// and [`split`] it, so a half-sent frame never holds up a thread.
#[cfg(test)]
pub(crate) fn read(mut r: impl io::Read) -> io::Result<(MessageHeader, Vec<u8>)> {
    let mut head = [0u8; HEADER_LEN];
    r.read_exact(&mut head)?;
    let mh = MessageHeader::from(head);
    let len = mh.length as usize;
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("ttrpc frame of {len} bytes exceeds {MAX_PAYLOAD}"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok((mh, payload))
}

/// Splits complete frames off the front of `buf`, leaving a partial one in place.
pub(crate) fn split(buf: &mut Vec<u8>) -> io::Result<Vec<(MessageHeader, Vec<u8>)>> {
    let mut frames = Vec::new();
    let mut at = 0;
    while buf.len() - at >= HEADER_LEN {
        let mh = MessageHeader::from(&buf[at..at + HEADER_LEN]);
        let len = mh.length as usize;
        if len > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("ttrpc frame of {len} bytes exceeds {MAX_PAYLOAD}"),
            ));
        }
        if buf.len() - at - HEADER_LEN < len {
            break;
        }
        let start = at + HEADER_LEN;
        frames.push((mh, buf[start..start + len].to_vec()));
        at = start + len;
    }
    buf.drain(..at);
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ttrpc::proto::MESSAGE_TYPE_REQUEST;

    #[test]
    fn split_keeps_partial_frames() {
        let mut buf = encode(1, MESSAGE_TYPE_REQUEST, b"hello");
        let second = encode(3, MESSAGE_TYPE_REQUEST, b"world!");
        buf.extend_from_slice(&second[..7]);
        let frames = split(&mut buf).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0.stream_id, 1);
        assert_eq!(frames[0].1, b"hello");
        assert_eq!(buf, second[..7]);
        buf.extend_from_slice(&second[7..]);
        let frames = split(&mut buf).unwrap();
        assert_eq!(
            (frames[0].0.stream_id, &frames[0].1[..]),
            (3, &b"world!"[..])
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut buf: Vec<u8> = MessageHeader {
            length: (MAX_PAYLOAD + 1) as u32,
            stream_id: 1,
            type_: MESSAGE_TYPE_REQUEST,
            flags: 0,
        }
        .into();
        assert!(split(&mut buf).is_err());
        assert!(read(&buf[..]).is_err());
    }
}
