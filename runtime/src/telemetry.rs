//! Traces: OpenTelemetry spans of the transactional-message protocol,
//! exported over OTLP/gRPC when an endpoint is configured, and the W3C
//! `traceparent` that carries a trace from process to process.
//!
//! Only Tandem's protocol spans are exported (target [`TARGET`]: a send,
//! a prepare, a commit, a check-back, a delivery), not every internal
//! span. The exporter runs on a small Tokio runtime of its own, so the
//! SDK's batch thread can drive the gRPC client, and so it works whichever
//! runtime the process uses.
//!
//! Only the OTLP/gRPC protocol is offered (`OTEL_EXPORTER_OTLP_PROTOCOL` is
//! not read). An export that fails is logged once, and again when exports
//! work again.
//!
//! A trace crosses processes two ways: in gRPC metadata (`traceparent`,
//! from an app to its sidecar and from a sidecar to its app) and in a
//! message's headers (from the producer's sidecar, through the
//! coordinator's log, to every consumer's sidecar). A process with tracing
//! off passes an incoming `traceparent` on unchanged.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::logging::{BadFilter, LogFormat, env_filter};
use crate::settings::{Kind, Setting};

/// The target of the spans that are exported.
pub const TARGET: &str = "tandem::trace";

/// The W3C trace-context header (in gRPC metadata and message headers).
pub const TRACEPARENT: &str = "traceparent";
/// Its vendor companion (not part of a message's identity either).
pub const TRACESTATE: &str = "tracestate";

/// Whether this process exports spans: when it does not, no span of
/// [`TARGET`] is made at all (a message's path costs nothing for traces).
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The OTLP endpoint setting every process has.
pub const OTLP_ENDPOINT: Setting = Setting {
    key: "otlp_endpoint",
    kind: Kind::Str,
    default: None,
    help: "OTLP/gRPC collector for traces (http://HOST:4317); unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT if set, else no traces",
};

/// Tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error(transparent)]
    Filter(#[from] BadFilter),
    /// The exporter's runtime could not start.
    #[error("cannot start the trace exporter's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The exporter could not be built from its settings.
    #[error("otlp_endpoint: {0}")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
}

/// The endpoint traces go to, if any: the setting, else the standard
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`;
/// none when `OTEL_SDK_DISABLED=true`.
fn endpoint(setting: Option<&str>) -> Option<Option<String>> {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return None;
    }
    if let Some(s) = setting.filter(|s| !s.trim().is_empty()) {
        return Some(Some(s.trim().to_owned()));
    }
    let from_env = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|e| !e.trim().is_empty()));
    from_env.then_some(None)
}

/// The span exporter, its exports driven on `runtime`.
#[derive(Debug)]
struct OnRuntime {
    inner: std::sync::Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
    /// The last export failed.
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl opentelemetry_sdk::trace::SpanExporter for OnRuntime {
    fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let failing = self.failing.clone();
        let spans = batch.len();
        let task = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            let result = task.await.unwrap_or_else(|e| {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    e.to_string(),
                ))
            });
            // Said once when exports start failing, and once when they
            // work again (not at every batch).
            use std::sync::atomic::Ordering;
            match &result {
                Err(e) if !failing.swap(true, Ordering::Relaxed) => {
                    tracing::warn!(error = %e, spans, "trace export failed; spans are dropped until it works");
                }
                Ok(()) if failing.swap(false, Ordering::Relaxed) => {
                    tracing::info!("trace export works again");
                }
                _ => {}
            }
            result
        }
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        if let Some(inner) = std::sync::Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// Logging and, when configured, trace export; flushes what is buffered
/// when dropped.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops exporting.
    pub fn shutdown(&mut self) {
        if self.provider.is_some() {
            EXPORTING.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("trace export did not finish: {e}");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Sets up logging to standard error (as [`crate::init_tracing`]) and, when
/// an OTLP endpoint is configured (`otlp_endpoint`, else the standard
/// `OTEL_EXPORTER_OTLP_*` variables), the export of Tandem's spans as
/// `service` (`OTEL_SERVICE_NAME` wins when set). A second call in one
/// process changes nothing and exports nothing.
pub fn init_telemetry(
    filter: &str,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    service: &str,
) -> Result<Telemetry, TelemetryError> {
    // Log lines do not show the protocol spans they happen in.
    let filter = env_filter(filter)?.add_directive(
        format!("{TARGET}=off")
            .parse()
            .expect("a fixed directive parses"),
    );
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => fmt.json().with_ansi(false).boxed(),
    };
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    let Some(endpoint) = endpoint(otlp_endpoint) else {
        let _ = registry.try_init();
        return Ok(Telemetry::default());
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tandem-otlp")
        .enable_all()
        .build()
        .map_err(TelemetryError::Runtime)?;
    let exporter = {
        use opentelemetry_otlp::WithExportConfig;
        let _inside = runtime.enter(); // the gRPC channel is made on it
        let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if let Some(e) = endpoint {
            b = b.with_endpoint(e);
        }
        b.build().map_err(TelemetryError::Exporter)?
    };
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| service.to_owned());
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            inner: std::sync::Arc::new(exporter),
            runtime: runtime.handle().clone(),
            failing: Default::default(),
        })
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(name)
                .build(),
        )
        .build();
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tandem"))
        .with_filter(
            tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::TRACE),
        );
    if registry.with(otel).try_init().is_err() {
        // Set up before: this provider would never see a span.
        let _ = provider.shutdown();
        runtime.shutdown_background();
        return Ok(Telemetry::default());
    }
    EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(Telemetry {
        provider: Some(provider),
        runtime: Some(runtime),
    })
}

/// The `traceparent` naming `span`, when traces are exported; `None`
/// otherwise.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the span `traceparent` names (nothing when it
/// does not parse, or traces are not exported).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier: std::collections::HashMap<String, String> =
        [(TRACEPARENT.to_owned(), traceparent.to_owned())].into();
    let cx = TraceContextPropagator::new().extract(&carrier);
    use opentelemetry::trace::TraceContextExt;
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// What to pass on for `span`, whose parent is `incoming`: its own
/// `traceparent` when traces are exported, else `incoming` unchanged.
pub fn pass_on(span: &tracing::Span, incoming: Option<&str>) -> Option<String> {
    traceparent(span).or_else(|| incoming.map(str::to_owned))
}

/// The `traceparent` of a request's gRPC metadata.
pub fn from_metadata(m: &tonic::metadata::MetadataMap) -> Option<String> {
    m.get(TRACEPARENT)?.to_str().ok().map(str::to_owned)
}

/// Puts `traceparent` (if any) in a request's gRPC metadata.
pub fn to_metadata(m: &mut tonic::metadata::MetadataMap, traceparent: Option<&str>) {
    if let Some(v) = traceparent.and_then(|t| t.parse().ok()) {
        m.insert(TRACEPARENT, v);
    }
}

/// A span of Tandem's protocol, exported as `name`, a child of the span
/// the `traceparent` `parent` gives, if any. Its `txn` and `topic` fields
/// are recorded by the caller. A disabled span when this process does not
/// export, and then `parent` is not called: a message's path does no trace
/// work at all.
pub fn span(name: &'static str, parent: impl FnOnce() -> Option<String>) -> tracing::Span {
    if !EXPORTING.load(std::sync::atomic::Ordering::Relaxed) {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "tandem",
        otel.name = name,
        txn = tracing::field::Empty,
        topic = tracing::field::Empty,
    );
    if let Some(p) = parent() {
        set_parent(&span, &p);
    }
    span
}

/// The `traceparent` among a message's headers (name, value).
pub fn from_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Option<String> {
    headers
        .into_iter()
        .find(|(n, _)| *n == TRACEPARENT)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}
