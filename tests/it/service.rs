//! The services beside the action service: grpc.health.v1 and server reflection (v1, v1alpha).
use crate::support::*;
use prost::Message;
use prost_types::{field_descriptor_proto::Type, FileDescriptorProto};
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const ACTION_SERVICE: &str = "callout.v1.HttpActionService";
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";
const CONTRACT_FILE: &str = "callout/v1/callout.proto";

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_action_service() {
    let sidecar = Sidecar::start().await;
    let mut health = HealthClient::new(sidecar.channel().await);
    for service in ["", ACTION_SERVICE] {
        let reply = health
            .check(HealthCheckRequest { service: service.into() })
            .await
            .unwrap_or_else(|s| panic!("Check({service:?}): {s:?}"))
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "Check({service:?})");
    }
    // An unknown name is not reported healthy.
    let unknown = health.check(HealthCheckRequest { service: "callout.v1.Nope".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
}

/// A reflection question, the same in v1 and v1alpha.
enum Ask {
    ListServices,
    Symbol(&'static str),
    File(String),
}

/// A reflection answer, the same in v1 and v1alpha.
#[derive(Debug)]
#[allow(dead_code)] // The payloads are read through Debug, in failure messages.
enum Answer {
    Services(Vec<String>),
    Files(Vec<Vec<u8>>),
    Error(i32, String),
    Other(String),
}

/// `ask_v1` and `ask_v1alpha`: one ServerReflectionInfo stream, one answer per question, in order
/// (a failed question ends the stream, so it must come last).
macro_rules! reflection_asker {
    ($name:ident, $version:ident) => {
        async fn $name(channel: Channel, asks: Vec<Ask>) -> Vec<Answer> {
            use tonic_reflection::pb::$version::{
                server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse, ServerReflectionRequest,
            };
            let count = asks.len();
            let requests: Vec<ServerReflectionRequest> = asks
                .into_iter()
                .map(|ask| ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(match ask {
                        Ask::ListServices => MessageRequest::ListServices(String::new()),
                        Ask::Symbol(s) => MessageRequest::FileContainingSymbol(s.into()),
                        Ask::File(f) => MessageRequest::FileByFilename(f),
                    }),
                })
                .collect();
            let mut replies = ServerReflectionClient::new(channel)
                .server_reflection_info(tokio_stream::iter(requests))
                .await
                .expect("ServerReflectionInfo")
                .into_inner();
            let mut answers = Vec::new();
            loop {
                // tonic-reflection answers a failed question with a stream error, which ends it.
                let reply = match replies.message().await {
                    Ok(Some(reply)) => reply,
                    Ok(None) => break,
                    Err(status) => {
                        answers.push(Answer::Error(status.code() as i32, status.message().to_owned()));
                        break;
                    }
                };
                answers.push(match reply.message_response.expect("message_response") {
                    MessageResponse::ListServicesResponse(list) => {
                        Answer::Services(list.service.into_iter().map(|s| s.name).collect())
                    }
                    MessageResponse::FileDescriptorResponse(files) => {
                        Answer::Files(files.file_descriptor_proto)
                    }
                    MessageResponse::ErrorResponse(e) => Answer::Error(e.error_code, e.error_message),
                    other => Answer::Other(format!("{other:?}")),
                });
            }
            assert_eq!(answers.len(), count, "one answer per question: {answers:?}");
            answers
        }
    };
}
reflection_asker!(ask_v1, v1);
reflection_asker!(ask_v1alpha, v1alpha);

fn services(answer: &Answer) -> &[String] {
    match answer {
        Answer::Services(names) => names,
        other => panic!("expected a service list, got {other:?}"),
    }
}

fn files(answer: &Answer) -> Vec<FileDescriptorProto> {
    match answer {
        Answer::Files(raw) => {
            assert!(!raw.is_empty(), "no descriptors");
            raw.iter()
                .map(|bytes| FileDescriptorProto::decode(bytes.as_slice()).expect("descriptor"))
                .collect()
        }
        other => panic!("expected descriptors, got {other:?}"),
    }
}

/// Checks that the contract's descriptor is complete enough for `grpcurl describe`: the request
/// message with `success_codes` and its comment, and the service with both methods.
fn check_contract(file: &FileDescriptorProto) {
    assert_eq!(file.package(), "callout.v1");
    let (msg_index, msg) = file
        .message_type
        .iter()
        .enumerate()
        .find(|(_, m)| m.name() == "ExecuteHttpActionRequest")
        .expect("ExecuteHttpActionRequest in the descriptor");
    let (field_index, field) =
        msg.field.iter().enumerate().find(|(_, f)| f.name() == "success_codes").expect("success_codes field");
    assert_eq!(field.r#type(), Type::String);
    assert_eq!(field.json_name(), "successCodes");

    // Comments travel in source_code_info: path [4 = message_type, i, 2 = field, j].
    let path = [4, msg_index as i32, 2, field_index as i32];
    let info = file.source_code_info.as_ref().expect("source_code_info (comments) kept in the descriptor");
    let comment = info
        .location
        .iter()
        .find(|l| l.path == path)
        .map(|l| l.leading_comments())
        .expect("a source location for success_codes");
    assert!(comment.contains("2xx"), "success_codes comment: {comment:?}");

    let service = file.service.iter().find(|s| s.name() == "HttpActionService").expect("service");
    let methods: Vec<(&str, bool)> =
        service.method.iter().map(|m| (m.name(), m.server_streaming())).collect();
    assert!(methods.contains(&("Execute", false)), "{methods:?}");
    assert!(methods.contains(&("ExecuteStream", true)), "{methods:?}");
}

/// The contract: listed, described by symbol, its imports resolvable by file name.
async fn check_reflection<F, Fut>(ask: F, reflection_service: &str)
where
    F: Fn(Channel, Vec<Ask>) -> Fut,
    Fut: std::future::Future<Output = Vec<Answer>>,
{
    let sidecar = Sidecar::start().await;
    let answers = ask(
        sidecar.channel().await,
        vec![
            Ask::ListServices,
            Ask::Symbol("callout.v1.ExecuteHttpActionRequest"),
            Ask::Symbol("nope.Nothing"),
        ],
    )
    .await;
    let listed = services(&answers[0]);
    for name in [ACTION_SERVICE, reflection_service] {
        assert!(listed.iter().any(|s| s == name), "{name} not listed: {listed:?}");
    }
    let described = files(&answers[1]);
    let contract = described.iter().find(|f| f.name() == CONTRACT_FILE).expect("the contract file");
    check_contract(contract);
    assert!(
        matches!(&answers[2], Answer::Error(code, _) if *code == tonic::Code::NotFound as i32),
        "an unknown symbol is NOT_FOUND: {:?}",
        answers[2]
    );

    // grpcurl then fetches each import by name; all must resolve.
    assert!(!contract.dependency.is_empty());
    let deps =
        ask(sidecar.channel().await, contract.dependency.iter().cloned().map(Ask::File).collect()).await;
    for (name, answer) in contract.dependency.iter().zip(&deps) {
        let got = files(answer);
        assert!(
            got.iter().any(|f| f.name() == name),
            "{name}: got {:?}",
            got.iter().map(|f| f.name()).collect::<Vec<_>>()
        );
    }
}

/// grpcurl lists and describes the health service too.
async fn check_health_reflected<F, Fut>(ask: F)
where
    F: Fn(Channel, Vec<Ask>) -> Fut,
    Fut: std::future::Future<Output = Vec<Answer>>,
{
    let sidecar = Sidecar::start().await;
    let answers = ask(sidecar.channel().await, vec![Ask::ListServices, Ask::Symbol(HEALTH_SERVICE)]).await;
    let listed = services(&answers[0]);
    assert!(listed.iter().any(|s| s == HEALTH_SERVICE), "{HEALTH_SERVICE} not listed: {listed:?}");
    let described = files(&answers[1]);
    assert!(described.iter().any(|f| f.package() == "grpc.health.v1"), "{described:?}");
}

#[tokio::test]
async fn reflection_v1_describes_the_contract() {
    check_reflection(ask_v1, "grpc.reflection.v1.ServerReflection").await;
}

#[tokio::test]
async fn reflection_v1alpha_describes_the_contract() {
    check_reflection(ask_v1alpha, "grpc.reflection.v1alpha.ServerReflection").await;
}

/// The details of an error status are google.rpc messages in an Any: a reflection client
/// (grpcurl) resolves them by name to print them, so both protocols describe them.
#[tokio::test]
async fn reflection_describes_the_error_details() {
    let sidecar = Sidecar::start().await;
    let symbols =
        ["google.rpc.BadRequest", "google.rpc.RetryInfo", "google.rpc.ErrorInfo", "google.rpc.Status"];
    let v1 = ask_v1(sidecar.channel().await, symbols.iter().map(|s| Ask::Symbol(s)).collect()).await;
    let v1alpha =
        ask_v1alpha(sidecar.channel().await, symbols.iter().map(|s| Ask::Symbol(s)).collect()).await;
    for answers in [&v1, &v1alpha] {
        for (symbol, answer) in symbols.iter().zip(answers) {
            let name = symbol.trim_start_matches("google.rpc.");
            let described = files(answer);
            assert!(
                described
                    .iter()
                    .any(|f| f.package() == "google.rpc" && f.message_type.iter().any(|m| m.name() == name)),
                "{symbol}: {:?}",
                described.iter().map(|f| f.name()).collect::<Vec<_>>()
            );
        }
    }
}

#[tokio::test]
async fn reflection_v1_lists_and_describes_health() {
    check_health_reflected(ask_v1).await;
}

#[tokio::test]
async fn reflection_v1alpha_lists_and_describes_health() {
    check_health_reflected(ask_v1alpha).await;
}
