//! Proto3 JSON of a reply, as grpcurl prints it (lowerCamelCase names, enum value names,
//! durations as `"1.5s"`, bytes as base64, fields at their default left out), so `callout
//! exec` and a gRPC call show one action the same way. Read through the descriptors compiled
//! into the binary (`pb::FILE_DESCRIPTOR_SET`): the mapping is the proto's, not hand-written.
use crate::pb;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use std::sync::OnceLock;

/// `reply` in proto3 JSON, pretty-printed with two spaces, in field order (as grpcurl).
pub fn reply_json(reply: &pb::ExecuteHttpActionResponse) -> Result<String, String> {
    to_json(reply, "callout.v1.ExecuteHttpActionResponse")
}

/// A `RenderedRequest` in proto3 JSON, as grpcurl prints Render's reply.
pub fn rendered_json(reply: &pb::RenderedRequest) -> Result<String, String> {
    to_json(reply, "callout.v1.RenderedRequest")
}

fn to_json(message: &impl Message, full_name: &str) -> Result<String, String> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    let pool = POOL
        .get_or_init(|| DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| format!("the compiled-in descriptors do not load: {e}"))?;
    let descriptor = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| format!("{full_name} is not in the descriptors"))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|e| format!("re-reading {full_name}: {e}"))?;
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, Numbers::default());
    dynamic
        .serialize_with_options(&mut serializer, &SerializeOptions::new())
        .map_err(|e| format!("writing {full_name} as JSON: {e}"))?;
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// serde_json's pretty output, but a whole-number double (a JSON body's `1` comes back in a
/// `google.protobuf.Value` as the double 1.0) written `1` rather than `1.0`, as grpcurl does.
#[derive(Default)]
struct Numbers(serde_json::ser::PrettyFormatter<'static>);

impl serde_json::ser::Formatter for Numbers {
    fn write_f64<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, value: f64) -> std::io::Result<()> {
        // Below 2^53 every whole number is exact as an i64.
        if value.fract() == 0.0 && value.abs() < 9_007_199_254_740_992.0 {
            return write!(writer, "{}", value as i64);
        }
        serde_json::ser::CompactFormatter.write_f64(writer, value)
    }
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object_value(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_reads_as_grpcurl_prints_it() {
        let reply = pb::ExecuteHttpActionResponse {
            action_id: "a-1".into(),
            outcome: pb::Outcome::Failed as i32,
            proceed: false,
            error: Some(pb::ActionError { kind: pb::ErrorKind::Timeout as i32, message: "slow".into() }),
            timing: Some(pb::ActionTiming {
                started_at: None,
                total: Some(prost_types::Duration { seconds: 1, nanos: 500_000_000 }),
            }),
            ..Default::default()
        };
        let text = reply_json(&reply).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["actionId"], "a-1");
        assert_eq!(value["outcome"], "OUTCOME_FAILED");
        assert_eq!(value["error"]["kind"], "ERROR_KIND_TIMEOUT");
        assert_eq!(value["timing"]["total"], "1.500s");
        assert!(value.get("proceed").is_none(), "defaults are left out, as grpcurl does: {text}");
        assert!(text.starts_with("{\n  \"actionId\""), "field order, two-space indent: {text}");
    }

    #[test]
    fn whole_numbers_in_a_json_body_stay_whole() {
        let number = |n: f64| prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(n)) };
        let list = prost_types::ListValue { values: vec![number(1.0), number(2.5), number(-3.0)] };
        let reply = pb::ExecuteHttpActionResponse {
            response: Some(pb::HttpResponse {
                body_json: Some(prost_types::Value { kind: Some(prost_types::value::Kind::ListValue(list)) }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let value: serde_json::Value = serde_json::from_str(&reply_json(&reply).unwrap()).unwrap();
        assert_eq!(value["response"]["bodyJson"].to_string(), "[1,2.5,-3]");
    }
}
