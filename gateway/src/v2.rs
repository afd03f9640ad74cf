//! The HTTP surface: the KServe Open Inference Protocol (v2 REST), a plain JSON form,
//! the agents' dial-out WebSocket, health and metrics.
//!
//! | route | what |
//! |---|---|
//! | `GET /v2/health/live`, `GET /v2/health/ready` | the gateway itself |
//! | `GET /v2/models/{name}.{namespace}` | model metadata and its replicas |
//! | `GET /v2/models/{name}.{namespace}/ready` | 200 when a replica is ready, else 503 |
//! | `POST /v2/models/{name}.{namespace}/infer` | v2 inference (one FP32 input) |
//! | `POST /v1/endpoints/{namespace}/{name}/predict` | `{"instances": [[..], ..]}` → `{"predictions": [[..], ..]}` |
//! | `GET /v2/connect` | an agent's replica connection (WebSocket, `Authorization: Bearer`) |
//! | `GET /metrics` | Prometheus |

use crate::registry::{Endpoint, Gateway, InferError, Output};
use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// The header a caller names its region in (LeastLoaded prefers replicas there).
pub const REGION_HEADER: &str = "x-edgeloom-region";

/// The gateway's routes.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v2/health/live", get(|| async { Json(json!({"live": true})) }))
        .route("/v2/health/ready", get(|| async { Json(json!({"ready": true})) }))
        .route("/v2", get(|| async {
            Json(json!({"name": "edgeloom-gateway", "version": env!("CARGO_PKG_VERSION"), "extensions": []}))
        }))
        .route("/v2/models/{model}", get(metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/infer", post(infer_v2))
        .route("/v1/endpoints/{namespace}/{name}/predict", post(predict))
        .route("/v2/connect", get(connect))
        .route(
            "/metrics",
            get(|State(gw): State<Arc<Gateway>>| async move { gw.metrics.render() }),
        )
        .layer(DefaultBodyLimit::max(body_limit(&gw.config)))
        .with_state(gw)
}

/// The largest request body: the largest request of any endpoint written as JSON (up to
/// 32 bytes a number), plus room for the rest; at most 256 MiB.
fn body_limit(cfg: &crate::GatewayConfig) -> usize {
    let values = cfg
        .endpoints
        .iter()
        .map(|e| e.max_rows as usize * e.input_shape.iter().map(|d| *d as usize).product::<usize>())
        .max()
        .unwrap_or(0);
    (values * 32 + (64 << 10)).min(256 << 20)
}

fn error(status: u16, message: impl Into<String>) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(json!({"error": message.into()})),
    )
        .into_response()
}

/// 503: the gateway is at `maxConcurrentRequests` (counted for the endpoint).
fn busy(gw: &Gateway, ep: &Endpoint) -> Response {
    gw.count(ep, 503);
    error(
        503,
        format!(
            "the gateway is at its limit of {} concurrent requests (maxConcurrentRequests)",
            gw.config.max_concurrent_requests
        ),
    )
}

/// 400 found by the gateway itself (counted for the endpoint).
fn rejected(gw: &Gateway, ep: &Endpoint, message: String) -> Response {
    gw.count(ep, 400);
    from_infer(InferError::BadRequest(message))
}

fn from_infer(e: InferError) -> Response {
    error(e.status(), e.message())
}

/// The endpoint a v2 model name stands for, or the 404 to answer.
fn find(gw: &Gateway, model: &str) -> Result<Arc<Endpoint>, Box<Response>> {
    gw.endpoint_by_model(model).ok_or_else(|| {
        Box::new(error(
            404,
            format!("no model {model:?}: models are named <endpoint>.<namespace>"),
        ))
    })
}

async fn metadata(State(gw): State<Arc<Gateway>>, Path(model): Path<String>) -> Response {
    let ep = match find(&gw, &model) {
        Ok(e) => e,
        Err(r) => return *r,
    };
    let mut shape: Vec<i64> = vec![-1];
    shape.extend(ep.cfg.input_shape.iter().map(|d| i64::from(*d)));
    Json(json!({
        "name": model,
        "platform": "pytorch_torchscript",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": shape}],
        "outputs": [{"name": "output", "datatype": "FP32"}],
        "replicas": gw.replicas(&ep),
    }))
    .into_response()
}

async fn model_ready(State(gw): State<Arc<Gateway>>, Path(model): Path<String>) -> Response {
    let ep = match find(&gw, &model) {
        Ok(e) => e,
        Err(r) => return *r,
    };
    let ready = gw.ready(&ep);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"name": model, "ready": ready}))).into_response()
}

fn region(headers: &HeaderMap) -> Option<String> {
    headers
        .get(REGION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct V2Request {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<V2Tensor>,
    #[serde(default)]
    #[allow(dead_code)]
    parameters: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    outputs: Option<Value>,
}

#[derive(Deserialize)]
struct V2Tensor {
    #[allow(dead_code)]
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Flat,
    #[serde(default)]
    #[allow(dead_code)]
    parameters: Option<Value>,
}

/// A tensor's numbers, flat or nested (row-major), read straight into float32: never a
/// JSON tree (which would cost about 8 times the floats' memory), at most as many values
/// as one frame holds; errors name the element (`data[2]`).
struct Flat(Vec<f32>);

impl<'de> Deserialize<'de> for Flat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Flat, D::Error> {
        let mut out = Vec::new();
        d.deserialize_any(FlatSeed {
            out: &mut out,
            path: "data".into(),
        })?;
        Ok(Flat(out))
    }
}

const MAX_VALUES: usize = edgeloom_crds::serving::MAX_FRAME / 4;

struct FlatSeed<'a> {
    out: &'a mut Vec<f32>,
    path: String,
}

impl<'de> serde::de::DeserializeSeed<'de> for FlatSeed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl FlatSeed<'_> {
    fn push<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        if self.out.len() >= MAX_VALUES {
            return Err(E::custom(format!(
                "data holds more than {MAX_VALUES} values"
            )));
        }
        self.out.push(v as f32);
        Ok(())
    }
}

impl<'de> serde::de::Visitor<'de> for FlatSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} to be a number or an array of numbers", self.path)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.push(v)
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.push(v as f64)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.push(v as f64)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        loop {
            let seed = FlatSeed {
                out: &mut *self.out,
                path: format!("{}[{i}]", self.path),
            };
            if seq.next_element_seed(seed)?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
}

async fn infer_v2(
    State(gw): State<Arc<Gateway>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ep = match find(&gw, &model) {
        Ok(e) => e,
        Err(r) => return *r,
    };
    let Some(_permit) = gw.admit() else {
        return busy(&gw, &ep);
    };
    let bad = |m: String| rejected(&gw, &ep, m);
    let req: V2Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return bad(format!(
                "the request body is not a v2 inference request: {e}"
            ));
        }
    };
    if req.inputs.len() != 1 {
        return bad(format!(
            "inputs must hold exactly one tensor, it holds {}",
            req.inputs.len()
        ));
    }
    let id = req.id;
    let Some(input) = req.inputs.into_iter().next() else {
        return bad("inputs must hold exactly one tensor".into());
    };
    if input.datatype != "FP32" {
        return bad(format!(
            "inputs[0].datatype must be \"FP32\", not {:?}",
            input.datatype
        ));
    }
    let Ok(shape) = input
        .shape
        .iter()
        .map(|d| u32::try_from(*d))
        .collect::<Result<Vec<u32>, _>>()
    else {
        return bad(format!(
            "inputs[0].shape {:?} must hold non-negative sizes",
            input.shape
        ));
    };
    let data = input.data.0;
    if let Err(e) = crate::registry::check_shape(&ep.cfg, &shape, data.len()) {
        return bad(format!("inputs[0].{}", e.message()));
    }
    match gw
        .infer(&ep, shape, data, region(&headers).as_deref())
        .await
    {
        Ok(Output {
            shape,
            data,
            replica,
        }) => {
            let mut body = json!({
                "model_name": model,
                "outputs": [{"name": "output", "datatype": "FP32", "shape": shape, "data": data}],
                "parameters": {"replica": replica},
            });
            if let Some(id) = id {
                body["id"] = Value::String(id);
            }
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e) => from_infer(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainRequest {
    instances: Vec<Flat>,
}

async fn predict(
    State(gw): State<Arc<Gateway>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(ep) = gw.endpoint(&namespace, &name) else {
        return error(404, format!("no endpoint {namespace}/{name}"));
    };
    let Some(_permit) = gw.admit() else {
        return busy(&gw, &ep);
    };
    let bad = |m: String| rejected(&gw, &ep, m);
    let req: PlainRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return bad(format!(
                "the request body must be {{\"instances\": [row, ...]}}: {e}"
            ));
        }
    };
    let row_len: usize = ep.cfg.input_shape.iter().map(|d| *d as usize).product();
    if req.instances.is_empty() {
        return bad("instances must hold at least one row".into());
    }
    let mut data = Vec::with_capacity(req.instances.len() * row_len);
    for (i, row) in req.instances.iter().enumerate() {
        if row.0.len() != row_len {
            return bad(format!(
                "instances[{i}] holds {} numbers; a row of {:?} holds {row_len}",
                row.0.len(),
                ep.cfg.input_shape
            ));
        }
        data.extend_from_slice(&row.0);
    }
    let rows = req.instances.len() as u32;
    let mut shape = vec![rows];
    shape.extend_from_slice(&ep.cfg.input_shape);
    match gw
        .infer(&ep, shape, data, region(&headers).as_deref())
        .await
    {
        Ok(out) => {
            let per_row = out.data.len() / (out.shape[0].max(1) as usize);
            let predictions: Vec<&[f32]> = out.data.chunks(per_row.max(1)).collect();
            Json(json!({"predictions": predictions})).into_response()
        }
        Err(e) => from_infer(e),
    }
}

async fn connect(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let (claims, ep) = match gw.authenticate(auth) {
        Ok(c) => c,
        Err((status, e)) => {
            tracing::warn!(error = %e, status, "refused a replica connection");
            return error(status, e);
        }
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return e.into_response(),
    };
    ws.max_message_size(edgeloom_crds::serving::MAX_FRAME)
        .max_frame_size(edgeloom_crds::serving::MAX_FRAME)
        .on_upgrade(move |socket| gw.run_replica(socket, claims, ep))
}
