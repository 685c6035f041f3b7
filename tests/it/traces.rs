//! One trace spans a client's write through central to every edge's apply,
//! its Keystone call and the ack, exported with OpenTelemetry (here to the
//! SDK's in-memory exporter); no attribute carries a secret.

use std::collections::HashMap;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use serde_json::json;
use syncgate::telemetry::LogFormat;

use crate::sync::sync_env;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn one<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let found: Vec<&SpanData> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(
        found.len(),
        1,
        "one '{name}' span expected: {:#?}",
        names(spans)
    );
    found[0]
}

fn names(spans: &[SpanData]) -> Vec<String> {
    spans.iter().map(|s| s.name.to_string()).collect()
}

fn attrs(span: &SpanData) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect()
}

#[tokio::test]
async fn a_write_is_one_trace_from_the_client_to_the_edges_ack() {
    let exporter = InMemorySpanExporter::default();
    let telemetry =
        syncgate::telemetry::init_with_exporter(LogFormat::Text, exporter.clone(), "syncgate-test")
            .expect("the only subscriber of this process");
    let mut env = sync_env(&[], None, |c| c.sync.edges = vec!["edge-a".into()]).await;
    // The edge asks for what follows its cursor at each hello: seldom here,
    // so that none reads the traced op before its publish reaches the edge
    // and the apply follows the publish, as live ops do.
    env.hello_interval = std::time::Duration::from_secs(5);
    env.add_edge("edge-a", None).await;
    // A first write brings the edge up to date: the traced one then arrives
    // live, as ops do.
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "warm-up"}}),
    )
    .await;
    env.until_delivered(&["edge-a"], &["applied"]).await;
    let secret = "trace-secret-51";
    let resp = env
        .http
        .post(format!("{}/v3/users", env.proxy))
        .header("x-auth-token", env.token())
        .header("traceparent", format!("00-{TRACE}-{CLIENT_SPAN}-01"))
        .json(&json!({"user": {"name": "traced", "password": secret}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    env.until_delivered(&["edge-a"], &["applied"]).await;
    env.until("the ack is received at central", || async {
        exporter
            .get_finished_spans()
            .unwrap()
            .iter()
            .any(|s| s.name == "ack received")
    })
    .await;
    let env_token = env.token().to_string();
    env.shutdown().await;

    let trace = TraceId::from_hex(TRACE).unwrap();
    let spans: Vec<SpanData> = exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect();
    let id = |s: &SpanData| s.span_context.span_id();
    let request = spans
        .iter()
        .find(|s| {
            s.name == "request" && attrs(s).get("path").map(String::as_str) == Some("/v3/users")
        })
        .unwrap_or_else(|| panic!("the write's request span: {:?}", names(&spans)));
    assert_eq!(
        request.parent_span_id,
        SpanId::from_hex(CLIENT_SPAN).unwrap(),
        "the client's traceparent is honoured"
    );
    let capture = one(&spans, "capture");
    assert_eq!(capture.parent_span_id, id(request));
    let upstream = spans
        .iter()
        .find(|s| s.name == "upstream" && s.parent_span_id == id(capture))
        .expect("the central Keystone call under the capture");
    assert_eq!(attrs(upstream)["http.response.status_code"], "201");
    let publish = one(&spans, "publish");
    assert_eq!(
        publish.parent_span_id,
        id(capture),
        "publish follows the write"
    );
    let apply = one(&spans, "apply");
    // Published, the edge follows the NATS headers (under the publish); read
    // by a replay first, should a hello's replay win the race after all, the
    // op's own trace context (under the capture): one trace either way.
    assert!(
        apply.parent_span_id == id(publish) || apply.parent_span_id == id(capture),
        "the apply follows the publish's headers or the op's trace context: {:?}",
        names(&spans)
    );
    let a = attrs(apply);
    assert_eq!(a["seq"], "2");
    assert_eq!(a["edge"], "edge-a");
    assert_eq!(a["outcome"], "applied");
    assert_eq!(a["op_id"], attrs(capture)["op_id"]);
    assert!(
        spans.iter().any(|s| s.name == "keystone"
            && s.parent_span_id == id(apply)
            && attrs(s)["http.request.method"] == "POST"),
        "the edge Keystone call under the apply: {:?}",
        names(&spans)
    );
    let ack = spans
        .iter()
        .find(|s| s.name == "ack" && s.parent_span_id == id(apply))
        .expect("the ack under the apply");
    let received = one(&spans, "ack received");
    assert_eq!(received.parent_span_id, id(ack));

    // No secret in any attribute or event of any span.
    let everything = exporter.get_finished_spans().unwrap();
    for span in &everything {
        let mut texts: Vec<String> = span
            .attributes
            .iter()
            .map(|kv| kv.value.to_string())
            .collect();
        for event in span.events.iter() {
            texts.push(event.name.to_string());
            texts.extend(event.attributes.iter().map(|kv| kv.value.to_string()));
        }
        for text in texts {
            assert!(!text.contains(secret), "{}: {text}", span.name);
            assert!(!text.contains(env_token.as_str()), "{}: {text}", span.name);
        }
    }
    telemetry.shutdown();
}
