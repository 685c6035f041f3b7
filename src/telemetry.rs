//! Logs and traces. Logs: `tracing` to stderr, as text or JSON, filtered by
//! `SYNCGATE_LOG` (or `RUST_LOG`), `info` by default; fields, not formatted
//! strings, so that logs can be searched by `op_id`, `seq` and `status`.
//!
//! Traces: the same `tracing` spans (a proxied request, a captured write, an
//! op's publication, its application at an edge, the edge's Keystone call, the
//! ack) exported with OpenTelemetry OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, over `http/protobuf` (the
//! default) or `grpc` as `OTEL_EXPORTER_OTLP_PROTOCOL` says, named by
//! `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`. Nothing is exported
//! otherwise. The W3C `traceparent` links them: taken from the client's write,
//! kept with the op, carried in the op's NATS headers, sent to each Keystone.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// What `main` keeps until exit: flushes the spans not yet exported.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still buffered (at most a few seconds).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("warning: traces not all exported at exit: {e}");
            }
        }
    }
}

/// Set once spans are exported: requests that are not captured then get spans too.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process exports spans.
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// The OTLP transport `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    HttpProtobuf,
    Grpc,
}

/// Where and how to export, from the standard variables; `None` when tracing
/// is off (no endpoint, `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`).
pub fn otlp_from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<OtlpProtocol>, String> {
    let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match set("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase()) {
        None => {}
        Some(v) if v == "otlp" => {}
        Some(v) if v == "none" => return Ok(None),
        Some(v) => {
            return Err(format!(
                "OTEL_TRACES_EXPORTER: '{v}' is not supported (otlp or none)"
            ))
        }
    }
    if set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        && set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
    {
        return Ok(None);
    }
    let (name, value) = match set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
        Some(v) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", v),
        None => (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            set("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| "http/protobuf".into()),
        ),
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "http/protobuf" => Ok(Some(OtlpProtocol::HttpProtobuf)),
        "grpc" => Ok(Some(OtlpProtocol::Grpc)),
        other => Err(format!(
            "{name}: '{other}' is not supported (http/protobuf or grpc)"
        )),
    }
}

/// How log lines are written: text for a terminal, JSON for collectors.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs logging, and trace export when the OTLP variables ask for it.
/// Call once, from `main`, inside the runtime (the gRPC exporter needs it);
/// `role` is the default service name (`syncgate-central`, ...).
pub fn init(format: LogFormat, role: &str) -> Result<Telemetry, String> {
    let provider = match otlp_from_env(|k| std::env::var(k).ok())? {
        None => None,
        Some(protocol) => Some(provider(otlp_exporter(protocol)?, role, true)),
    };
    install(format, provider.as_ref())?;
    Ok(Telemetry { provider })
}

/// Installs logging and exports spans to `exporter` as they end (tests).
pub fn init_with_exporter(
    format: LogFormat,
    exporter: impl SpanExporter + 'static,
    role: &str,
) -> Result<Telemetry, String> {
    let provider = provider(exporter, role, false);
    install(format, Some(&provider))?;
    Ok(Telemetry {
        provider: Some(provider),
    })
}

fn install(format: LogFormat, provider: Option<&SdkTracerProvider>) -> Result<(), String> {
    let filter = std::env::var("SYNCGATE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colour only for a person at a terminal, never in files or journald.
    let ansi = std::io::stderr().is_terminal();
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    // Spans are exported at info whatever the log level: quieter logs do not
    // break traces.
    let traces = provider.map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("syncgate"))
            .with_filter(
                Targets::new()
                    .with_target("syncgate", LevelFilter::INFO)
                    .with_default(LevelFilter::OFF),
            )
    });
    let exporting = traces.is_some();
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| format!("cannot install logging: {e}"))?;
    EXPORTING.store(exporting, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

fn provider(exporter: impl SpanExporter + 'static, role: &str, batch: bool) -> SdkTracerProvider {
    // The standard variables name the service; the role when they do not.
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name(role.to_string());
    }
    let builder = SdkTracerProvider::builder().with_resource(resource.build());
    let builder = if batch {
        builder.with_batch_exporter(exporter)
    } else {
        builder.with_simple_exporter(exporter)
    };
    builder.build()
}

fn otlp_exporter(protocol: OtlpProtocol) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let built = match protocol {
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(OtlpHttpClient::new()?)
            .build(),
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(opentelemetry_otlp::Protocol::Grpc)
            .build(),
    };
    built.map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: cannot export traces: {e}"))
}

/// The OTLP/HTTP exporter's client: the project's own reqwest (rustls, the
/// system's roots), run on the process's runtime (the exporter calls it from
/// its own thread).
#[derive(Debug)]
struct OtlpHttpClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl OtlpHttpClient {
    fn new() -> Result<OtlpHttpClient, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "trace export needs the async runtime".to_string())?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build the OTLP client: {e}"))?;
        Ok(OtlpHttpClient { client, runtime })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let answer = self
            .runtime
            .spawn(async move {
                let resp = client.execute(request).await?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = resp.bytes().await?;
                Ok::<_, reqwest::Error>((status, headers, body))
            })
            .await??;
        let (status, headers, body) = answer;
        let mut response = opentelemetry_http::Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// The W3C `traceparent` of a span, when it is traced.
pub fn traceparent(span: &Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span a `traceparent` names. An invalid
/// or missing value leaves the span where it is.
pub fn follow(span: &Span, traceparent: Option<&str>) {
    let Some(value) = traceparent.filter(|v| valid_traceparent(v)) else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_string(), value.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// A W3C `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`, IDs not all zero.
pub fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_standard_variables_choose_the_exporter() {
        assert_eq!(otlp_from_env(env(&[])), Ok(None));
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert_eq!(
            otlp_from_env(env(&[ep])),
            Ok(Some(OtlpProtocol::HttpProtobuf))
        );
        assert_eq!(
            otlp_from_env(env(&[ep, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])),
            Ok(Some(OtlpProtocol::Grpc))
        );
        assert_eq!(
            otlp_from_env(env(&[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ])),
            Ok(Some(OtlpProtocol::Grpc))
        );
        assert_eq!(
            otlp_from_env(env(&[ep, ("OTEL_SDK_DISABLED", "true")])),
            Ok(None)
        );
        assert_eq!(
            otlp_from_env(env(&[ep, ("OTEL_TRACES_EXPORTER", "none")])),
            Ok(None)
        );
        let err =
            otlp_from_env(env(&[ep, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")])).unwrap_err();
        assert!(err.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && err.contains("http/json"));
    }

    #[test]
    fn traceparents_are_checked() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
    }
}
