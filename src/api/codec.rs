//! The protobuf codec of callout's services: tonic-prost's, except that a message that does not
//! decode (a string that is not UTF-8, a truncated field) is the caller's fault:
//! INVALID_ARGUMENT naming the field, where tonic-prost says INTERNAL.
use super::status::invalid_argument;
use crate::action::InvalidAction;
use prost::Message;
use std::marker::PhantomData;
use tonic::{
    codec::{Codec, DecodeBuf, Decoder},
    Status,
};
use tonic_prost::ProstEncoder;

/// Named in build.rs (`codec_path`), so the generated services and clients use it.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder(PhantomData)
    }
}

/// Decodes `U`; a decode error becomes INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct ProtoDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| undecodable(&e))
    }
}

/// INVALID_ARGUMENT for a message that does not decode, with a field violation when prost
/// knows the field. prost keeps its field path private; its text is
/// "failed to decode Protobuf message: Inner.field: Outer.field: description", innermost first.
fn undecodable(e: &prost::DecodeError) -> Status {
    let text = e.to_string();
    let mut rest = text.strip_prefix("failed to decode Protobuf message: ").unwrap_or(&text);
    let mut path = Vec::new();
    while let Some((segment, after)) = rest.split_once(": ") {
        match segment.split_once('.') {
            Some((message, field)) if is_ident(message) && is_ident(field) => path.push(field),
            _ => break,
        }
        rest = after;
    }
    if path.is_empty() {
        return Status::invalid_argument(format!("the request message does not decode: {rest}"));
    }
    path.reverse();
    let mut bad = InvalidAction::default();
    bad.push(path.join("."), format!("does not decode: {rest}"));
    invalid_argument(&bad)
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use tonic_types::StatusExt;

    #[test]
    fn a_bad_string_names_its_field() {
        // KeyValue{name: b"\xff"} inside ExecuteHttpActionRequest.headers (field 5).
        let bytes = [0x2a, 0x03, 0x0a, 0x01, 0xff];
        let e = pb::ExecuteHttpActionRequest::decode(&bytes[..]).unwrap_err();
        let status = undecodable(&e);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let violations = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, "headers.name", "{status:?}");
        assert!(violations[0].description.contains("UTF-8"), "{status:?}");
    }

    #[test]
    fn a_truncated_message_is_invalid_too() {
        let e = pb::ExecuteHttpActionRequest::decode(&[0x1a, 0x05, b'h'][..]).unwrap_err();
        assert_eq!(undecodable(&e).code(), tonic::Code::InvalidArgument);
    }
}
