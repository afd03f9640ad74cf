//! The gateway's Prometheus metrics, labelled by endpoint (`namespace/name`).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by HTTP status code.
    pub requests: IntCounterVec,
    /// Seconds from receiving a request to answering it (queueing and retries included).
    pub latency: HistogramVec,
    /// Requests tried again on another replica.
    pub retries: IntCounterVec,
    /// Replicas ejected, by reason (`failures`, `heartbeat`).
    pub ejections: IntCounterVec,
    /// Connected replicas, by state (`ready`, `unready`, `draining`).
    pub replicas: IntGaugeVec,
    /// Requests held while no replica is ready.
    pub queued: IntGaugeVec,
    /// Frames a replica sent that answer nothing it was asked (ignored).
    pub unsolicited: IntCounterVec,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "edgeloom_gateway_requests_total",
                "Inference requests answered, by endpoint and HTTP status code",
            ),
            &["endpoint", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "edgeloom_gateway_request_duration_seconds",
                "Time from receiving an inference request to answering it",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["endpoint"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "edgeloom_gateway_retries_total",
                "Requests tried again on another replica",
            ),
            &["endpoint"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "edgeloom_gateway_ejections_total",
                "Replicas ejected, by reason",
            ),
            &["endpoint", "reason"],
        )?;
        let replicas = IntGaugeVec::new(
            Opts::new(
                "edgeloom_gateway_replicas",
                "Replicas connected to this gateway, by state",
            ),
            &["endpoint", "state"],
        )?;
        let queued = IntGaugeVec::new(
            Opts::new(
                "edgeloom_gateway_queued_requests",
                "Requests held while no replica of the endpoint is ready",
            ),
            &["endpoint"],
        )?;
        let unsolicited = IntCounterVec::new(
            Opts::new(
                "edgeloom_gateway_unsolicited_frames_total",
                "Frames from a replica that answer no request sent to it (ignored)",
            ),
            &["endpoint"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(ejections.clone()))?;
        registry.register(Box::new(replicas.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(unsolicited.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            latency,
            retries,
            ejections,
            replicas,
            queued,
            unsolicited,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
