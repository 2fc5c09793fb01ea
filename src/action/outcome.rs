//! What an action produced: the outcome, the last response, every attempt and their timings.
use bytes::Bytes;
use std::{
    fmt,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

/// Why an action, or one attempt, failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    InvalidRequest,
    DeniedByPolicy,
    Dns,
    Connect,
    Tls,
    Timeout,
    Protocol,
    BodyTooLarge,
    UnexpectedStatus,
    RateLimited,
    CircuitOpen,
    Cancelled,
    /// Credentials could not be obtained (the OAuth2 token endpoint failed); nothing was sent.
    Auth,
    /// success_condition was false (or failed to evaluate), or retry_condition still true.
    ConditionFailed,
}

impl ErrorKind {
    /// The contract's name for the kind, e.g. `"TIMEOUT"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "INVALID_REQUEST",
            Self::DeniedByPolicy => "DENIED_BY_POLICY",
            Self::Dns => "DNS",
            Self::Connect => "CONNECT",
            Self::Tls => "TLS",
            Self::Timeout => "TIMEOUT",
            Self::Protocol => "PROTOCOL",
            Self::BodyTooLarge => "BODY_TOO_LARGE",
            Self::UnexpectedStatus => "UNEXPECTED_STATUS",
            Self::RateLimited => "RATE_LIMITED",
            Self::CircuitOpen => "CIRCUIT_OPEN",
            Self::Cancelled => "CANCELLED",
            Self::Auth => "AUTH",
            Self::ConditionFailed => "CONDITION_FAILED",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure with its kind and a message fit to show (no secrets, no URL credentials).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ActionError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

impl fmt::Display for ActionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// A response head, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub version: &'static str,
    /// In the order received, repeated names kept.
    pub headers: Vec<(String, String)>,
}

/// The last response of an action, with its (possibly capped) body.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseData {
    pub head: ResponseHead,
    pub body: Bytes,
    pub body_json: Option<serde_json::Value>,
    pub body_text: Option<String>,
    pub truncated: bool,
    /// The action's `extract` paths applied to this body, by name.
    pub extracted: Vec<(String, serde_json::Value)>,
}

impl ResponseData {
    /// A response whose body was not read (or had none): the head alone.
    pub fn head_only(head: ResponseHead) -> Self {
        Self {
            head,
            body: Bytes::new(),
            body_json: None,
            body_text: None,
            truncated: false,
            extracted: Vec::new(),
        }
    }
}

/// Timings of one attempt. Connection phases are zero when a pooled connection was reused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttemptTiming {
    pub dns: Duration,
    pub connect: Duration,
    pub tls: Duration,
    pub first_byte: Option<Duration>,
    pub total: Duration,
    pub reused_connection: bool,
}

/// One try and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub number: u32,
    pub status: Option<u16>,
    pub error: Option<ActionError>,
    pub timing: AttemptTiming,
    pub remote_addr: Option<SocketAddr>,
    /// The wait before the next attempt; `None` on the last one.
    pub backoff: Option<Duration>,
    /// A poll of a 202's Location (`async_poll`), not the action's own request.
    pub poll: bool,
    /// With pagination: the page (1-based) the attempt belongs to; 0 without.
    pub page: u32,
}

impl AttemptRecord {
    /// Attempt `number`, before anything is known of how it went.
    pub fn new(number: u32) -> Self {
        Self {
            number,
            status: None,
            error: None,
            timing: AttemptTiming::default(),
            remote_addr: None,
            backoff: None,
            poll: false,
            page: 0,
        }
    }
}

/// One page of a paginated action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRecord {
    /// 1 for the action's own request.
    pub number: u32,
    /// The page's last response status.
    pub status: Option<u16>,
    /// Scheme, host, port and path only (`paginate::shown_url`).
    pub url: String,
    /// From the page's first attempt to its end.
    pub total: Duration,
    /// Items the page gave (those kept under the cap).
    pub items: u32,
    pub attempts: u32,
    /// On the last page of a successful action: why pagination stopped.
    pub end: Option<super::PaginationEnd>,
}

/// The verdict of a whole action.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub action_id: String,
    pub succeeded: bool,
    /// Whether the engine should go on: succeeded, or failed under CONTINUE.
    pub proceed: bool,
    pub error: Option<ActionError>,
    pub response: Option<ResponseData>,
    pub attempts: Vec<AttemptRecord>,
    pub started_at: SystemTime,
    pub total: Duration,
    /// Which body fields the reply carries (the action's choice).
    pub reply_body: super::ReplyBody,
    /// The last response's `extract` results, by name.
    pub extracted: Vec<(String, serde_json::Value)>,
    /// The last attempt ended with its retry_condition true (a durable runner retries it).
    pub condition_retry: bool,
    /// With pagination: the pages' items, in order, under the cap (none when streamed).
    pub items: Vec<serde_json::Value>,
    /// With pagination: every page requested.
    pub pages: Vec<PageRecord>,
    /// The last attempt answered 202 with a Location to poll, and the action does not poll
    /// inline (`HttpAction::one_attempt`): the durable runner stores the poll as its next step.
    pub poll_due: Option<PollDue>,
}

/// A 202's Location, due to be polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollDue {
    /// Resolved against the URL that answered the 202.
    pub location: url::Url,
    /// The 202's Retry-After, if any.
    pub retry_after: Option<Duration>,
}
