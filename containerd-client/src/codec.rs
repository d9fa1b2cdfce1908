//! rust-protobuf messages as the payloads of gRPC frames, for tonic: no prost types, no
//! `protoc`.

use std::marker::PhantomData;

use bytes::{Buf, BufMut};
use protobuf::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Encodes and decodes rust-protobuf messages as gRPC frames' payloads.
pub struct ProtoCodec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for ProtoCodec<E, D> {
    fn default() -> Self {
        ProtoCodec(PhantomData)
    }
}

impl<E: Message, D: Message> Codec for ProtoCodec<E, D> {
    type Encode = E;
    type Decode = D;
    type Encoder = ProtoEncoder<E>;
    type Decoder = ProtoDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        ProtoEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder(PhantomData)
    }
}

pub struct ProtoEncoder<E>(PhantomData<fn(E)>);

impl<E: Message> Encoder for ProtoEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let bytes = item
            .write_to_bytes()
            .map_err(|e| Status::internal(format!("encode {}: {e}", E::NAME)))?;
        dst.put_slice(&bytes);
        Ok(())
    }
}

pub struct ProtoDecoder<D>(PhantomData<fn() -> D>);

impl<D: Message> Decoder for ProtoDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        D::parse_from_bytes(&bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("decode {}: {e}", D::NAME)))
    }
}
