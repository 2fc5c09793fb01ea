//! Logs and traces: the tracing subscriber (pretty or JSON lines on stderr) and, in builds with
//! the `otlp` feature, span export over OTLP/gRPC with each action's span joined to the caller's
//! trace. Without the feature the trace context is still propagated (see `exec`), only not
//! exported.
use crate::action::TraceContext;
use serde::{Deserialize, Deserializer, Serialize};
use tracing_subscriber::{
    layer::SubscriberExt as _, util::SubscriberInitExt as _, EnvFilter, Layer, Registry,
};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    // For people at a terminal.
    #[default]
    Pretty,
    // One JSON object per line, for log pipelines.
    Json,
}

/// Which finished actions are logged (at info, one line each). Every action is counted in the
/// metrics either way; a line per success is an access log, worth its cost only when wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ActionLog {
    /// Every action.
    All,
    /// Failed actions (including refused and cancelled ones).
    #[default]
    Failed,
    /// None.
    Off,
}

/// The `[log]` section: log lines, their format and level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `pretty` (human) or `json` (one object per line). Default `pretty`.
    pub format: LogFormat,
    /// A tracing filter (`info`, `callout=debug,info`); `RUST_LOG`, when set, wins. Default `info`.
    #[serde(deserialize_with = "filter")]
    pub level: String,
    /// Which finished actions get a line (the executor's `action_log`). Default `failed`.
    pub actions: ActionLog,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, level: "info".into(), actions: ActionLog::default() }
    }
}

/// A level that is a valid tracing filter.
fn filter<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let level = String::deserialize(d)?;
    EnvFilter::try_new(&level).map_err(|e| serde::de::Error::custom(format!("{level:?}: {e}")))?;
    Ok(level)
}

/// The `[tracing]` section: span export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingSettings {
    /// OTLP/gRPC collector to export spans to, e.g. `http://127.0.0.1:4317`; needs a build
    /// with `--features otlp`. Default none (spans are only logged).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans. Default `callout`.
    pub service_name: String,
}

impl Default for TracingSettings {
    fn default() -> Self {
        Self { otlp_endpoint: None, service_name: "callout".into() }
    }
}

/// What must be flushed before exit.
#[derive(Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered.
    pub fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("callout: flushing OTLP spans: {e}");
            }
        }
    }
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `log.level`.
pub fn init(log: &LogSettings, spans: &TracingSettings) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    // Colours only for a person at a terminal: escape codes in a log file or pipeline are noise,
    // and styling every field costs several microseconds per action line.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let fmt: BoxedLayer = match log.format {
        // One JSON object per line, the event's fields at the top level, for log pipelines, with
        // the current span (a line logged during an action says which). Not the list of every
        // span: it would repeat the current one's fields a third time on each line.
        LogFormat::Json => {
            Box::new(fmt.json().flatten_event(true).with_current_span(true).with_span_list(false))
        }
        LogFormat::Pretty => Box::new(fmt),
    };
    #[cfg_attr(not(feature = "otlp"), allow(unused_mut))]
    let mut layers: Vec<BoxedLayer> = vec![fmt];
    let telemetry = Telemetry::default();
    #[cfg(feature = "otlp")]
    let telemetry = match &spans.otlp_endpoint {
        Some(endpoint) => {
            let (layer, provider) = otlp::layer(endpoint, &spans.service_name)?;
            layers.push(layer);
            SPANS_EXPORTED.store(true, std::sync::atomic::Ordering::Relaxed);
            Telemetry { provider: Some(provider) }
        }
        None => telemetry,
    };
    #[cfg(not(feature = "otlp"))]
    if spans.otlp_endpoint.is_some() {
        return Err("tracing.otlp_endpoint needs a build with `--features otlp`".into());
    }
    tracing_subscriber::registry().with(layers.with_filter(filter)).try_init().map_err(|e| e.to_string())?;
    Ok(telemetry)
}

/// Set once spans are exported (OTLP).
static SPANS_EXPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans leave the process. Spans that only give log lines context can then be made at
/// debug level: at info nothing is logged inside them, so they would only cost time.
pub fn spans_exported() -> bool {
    SPANS_EXPORTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Makes `span` a child of the caller's trace, so exported spans join it.
pub fn join_trace(span: &tracing::Span, trace: &TraceContext) {
    #[cfg(feature = "otlp")]
    otlp::join(span, trace);
    #[cfg(not(feature = "otlp"))]
    let _ = (span, trace);
}

/// The span id of the current exported span, for the outbound `traceparent`, so the upstream's
/// spans hang under callout's. `None` when spans are not exported.
pub fn current_span_id() -> Option<String> {
    #[cfg(feature = "otlp")]
    return otlp::current_span_id();
    #[cfg(not(feature = "otlp"))]
    None
}

#[cfg(feature = "otlp")]
mod otlp {
    use super::{BoxedLayer, TraceContext};
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
    };
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::{trace::SdkTracerProvider, Resource};
    use std::str::FromStr as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    pub(super) fn layer(endpoint: &str, service: &str) -> Result<(BoxedLayer, SdkTracerProvider), String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("tracing.otlp_endpoint {endpoint:?}: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service.to_owned()).build())
            .build();
        let tracer = provider.tracer("callout");
        Ok((Box::new(tracing_opentelemetry::layer().with_tracer(tracer)), provider))
    }

    pub(super) fn join(span: &tracing::Span, trace: &TraceContext) {
        let (Ok(trace_id), Ok(span_id)) =
            (TraceId::from_hex(&trace.trace_id), SpanId::from_hex(&trace.parent_id))
        else {
            return;
        };
        let state = trace.state.as_deref().and_then(|s| TraceState::from_str(s).ok()).unwrap_or_default();
        let remote = SpanContext::new(trace_id, span_id, TraceFlags::new(trace.flags), true, state);
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }

    pub(super) fn current_span_id() -> Option<String> {
        let context = tracing::Span::current().context();
        let span = context.span();
        let span_context = span.span_context();
        span_context.is_valid().then(|| span_context.span_id().to_string())
    }
}
