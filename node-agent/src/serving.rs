//! Serving one replica of an inference endpoint (docs/ARCHITECTURE.md, "Serving").
//!
//! The agent keeps an `edgeloom-runner serve` process holding the model and dials *out* to
//! the gateway's `/v2/connect` WebSocket with the replica credential the operator issued:
//! the edge node accepts no connection at all, so it works behind NAT. Requests come down
//! the WebSocket and go to the runner's stdin; answers go back up. When the runner crashes
//! the agent tells the gateway the replica is not ready, fails what was in flight as
//! `Unavailable` (the gateway retries those elsewhere) and restarts it with backoff. When
//! the connection drops the agent dials again with backoff. On shutdown it drains: it says
//! `draining`, answers what it was sent, then closes.

use edgeloom_crds::serving::{FailCode, Frame, ReplicaStatus, ServeConfig};
use futures::{SinkExt, StreamExt};
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// What a replica needs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The gateway's connect URL, `ws://host:port/v2/connect`.
    pub gateway: String,
    /// The operator-issued replica credential.
    pub credential: String,
    /// The runner binary.
    pub runner: PathBuf,
    /// How the runner serves the model.
    pub config: ServeConfig,
    /// How long a drain waits for in-flight requests.
    pub drain_grace: Duration,
}

/// What the runner supervisor tells the connection loop.
enum FromRunner {
    Frame(Frame),
    Exited(String),
}

/// Keeps one runner alive: starts it, forwards its frames, restarts it after a crash with
/// backoff (0.2 s doubling to 5 s; reset once a runner has been ready for 30 s).
fn supervise(
    opts: ServeOptions,
    events: mpsc::UnboundedSender<FromRunner>,
    mut requests: mpsc::UnboundedReceiver<Vec<u8>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let config = match serde_json::to_string(&opts.config) {
            Ok(c) => c,
            Err(e) => {
                let _ = events.send(FromRunner::Exited(format!("serve config: {e}")));
                return;
            }
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            if *stop.borrow() {
                return;
            }
            // Requests queued for the runner that died were failed as Unavailable already.
            while requests.try_recv().is_ok() {}
            let started = std::time::Instant::now();
            let child = tokio::process::Command::new(&opts.runner)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => {
                    let _ = events.send(FromRunner::Exited(format!(
                        "starting {}: {e}",
                        opts.runner.display()
                    )));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let mut stdin = child.stdin.take().expect("piped stdin");
            let mut stdout = child.stdout.take().expect("piped stdout");
            let reader_events = events.clone();
            let mut reader = tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 4];
                    if stdout.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let len = u32::from_le_bytes(len) as usize;
                    if len > edgeloom_crds::serving::MAX_FRAME {
                        return;
                    }
                    let mut body = vec![0u8; len];
                    if stdout.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    match Frame::decode(&body) {
                        Ok(f) => {
                            if reader_events.send(FromRunner::Frame(f)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            // The runner is out of step or broken: stop reading, which
                            // makes the supervisor replace it.
                            tracing::warn!(error = %e, "undecodable frame from the runner");
                            return;
                        }
                    }
                }
            });
            // A JoinHandle must not be polled again once it has completed.
            let mut reader_done = false;
            let exit = loop {
                tokio::select! {
                    status = child.wait() => break match status {
                        Ok(s) => format!("the runner exited ({s})"),
                        Err(e) => format!("waiting for the runner: {e}"),
                    },
                    // Its output ended or broke while it runs: it can answer nothing more.
                    _ = &mut reader, if !reader_done => {
                        reader_done = true;
                        let _ = child.kill().await;
                        break "the runner's output broke off; it was stopped".to_string();
                    }
                    req = requests.recv() => match req {
                        Some(bytes) => {
                            let len = (bytes.len() as u32).to_le_bytes();
                            if stdin.write_all(&len).await.is_err()
                                || stdin.write_all(&bytes).await.is_err()
                                || stdin.flush().await.is_err()
                            {
                                // The runner is going away; its exit comes next.
                            }
                        }
                        None => return,
                    },
                    _ = stop.changed() => {
                        // Close stdin: the runner answers what it holds and exits.
                        drop(stdin);
                        if tokio::time::timeout(Duration::from_secs(5), child.wait())
                            .await
                            .is_err()
                        {
                            let _ = child.kill().await;
                        }
                        if !reader_done {
                            let _ = tokio::time::timeout(Duration::from_secs(1), &mut reader).await;
                        }
                        reader.abort();
                        return;
                    }
                }
            };
            // Forward what the runner wrote before it died, then say it is gone.
            if !reader_done
                && tokio::time::timeout(Duration::from_secs(1), &mut reader)
                    .await
                    .is_err()
            {
                reader.abort();
            }
            tracing::warn!(reason = %exit, "serving runner stopped; restarting");
            let _ = events.send(FromRunner::Exited(exit));
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(200);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn dial(opts: &ServeOptions) -> Result<Ws, String> {
    let mut req = opts
        .gateway
        .as_str()
        .into_client_request()
        .map_err(|e| format!("gateway URL {}: {e}", opts.gateway))?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", opts.credential)
            .parse()
            .map_err(|_| "the credential is not a valid header value".to_string())?,
    );
    let limits = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(edgeloom_crds::serving::MAX_FRAME))
        .max_frame_size(Some(edgeloom_crds::serving::MAX_FRAME));
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(req, Some(limits), true),
    )
    .await
    .map_err(|_| format!("connecting to {} timed out after 10 s", opts.gateway))?
    .map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            format!(
                "the gateway refused the replica ({}): {body}",
                resp.status()
            )
        }
        e => format!("connecting to {}: {e}", opts.gateway),
    })?;
    Ok(ws)
}

async fn send(ws: &mut Option<Ws>, frame: &Frame) {
    if let Some(w) = ws.as_mut()
        && w.send(Message::Binary(frame.encode().into()))
            .await
            .is_err()
    {
        *ws = None;
    }
}

/// Serves the replica until `shutdown` resolves, then drains.
pub async fn run(opts: ServeOptions, shutdown: impl std::future::Future<Output = ()>) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (requests, requests_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let supervisor = supervise(opts.clone(), events_tx, requests_rx, stop_rx);

    let mut status = ReplicaStatus {
        ready: false,
        reason: Some("the runner is loading the model".into()),
        ..Default::default()
    };
    // Requests the current runner holds.
    let mut outstanding: HashSet<u64> = HashSet::new();
    let mut ws: Option<Ws> = None;
    let mut next_dial = tokio::time::Instant::now();
    let mut dial_backoff = Duration::from_millis(200);
    let mut drain_until: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    let mut refused_logged = false;
    let mut connected_at = tokio::time::Instant::now();

    loop {
        if let Some(until) = drain_until
            && (outstanding.is_empty() || tokio::time::Instant::now() >= until)
        {
            break;
        }
        if ws.is_none() && drain_until.is_none() && tokio::time::Instant::now() >= next_dial {
            match dial(&opts).await {
                Ok(mut w) => {
                    tracing::info!(gateway = %opts.gateway, "replica connected to the gateway");
                    refused_logged = false;
                    connected_at = tokio::time::Instant::now();
                    let hello = Frame::Status(status.clone()).encode();
                    if w.send(Message::Binary(hello.into())).await.is_ok() {
                        ws = Some(w);
                    } else {
                        next_dial = tokio::time::Instant::now() + dial_backoff;
                        dial_backoff = (dial_backoff * 2).min(Duration::from_secs(5));
                    }
                }
                Err(e) => {
                    if !refused_logged {
                        tracing::warn!(error = %e, "cannot reach the gateway; dialling again with backoff");
                        refused_logged = true;
                    }
                    next_dial = tokio::time::Instant::now() + dial_backoff;
                    dial_backoff = (dial_backoff * 2).min(Duration::from_secs(5));
                }
            }
            continue;
        }
        tokio::select! {
            ev = events.recv() => match ev {
                Some(FromRunner::Frame(Frame::Status(s))) => {
                    status = ReplicaStatus { draining: drain_until.is_some(), ..s };
                    send(&mut ws, &Frame::Status(status.clone())).await;
                }
                Some(FromRunner::Frame(f)) => {
                    if let Some(id) = f.id() {
                        outstanding.remove(&id);
                    }
                    send(&mut ws, &f).await;
                }
                Some(FromRunner::Exited(reason)) => {
                    status = ReplicaStatus {
                        ready: false,
                        draining: drain_until.is_some(),
                        reason: Some(reason.clone()),
                        ..Default::default()
                    };
                    send(&mut ws, &Frame::Status(status.clone())).await;
                    for id in outstanding.drain() {
                        send(&mut ws, &Frame::Failed {
                            id,
                            code: FailCode::Unavailable,
                            message: reason.clone(),
                        }).await;
                    }
                }
                None => break,
            },
            msg = async {
                match ws.as_mut() {
                    Some(w) => w.next().await,
                    None => std::future::pending().await,
                }
            } => match msg {
                Some(Ok(Message::Binary(b))) => {
                    match Frame::decode(&b) {
                        Ok(Frame::Request { id, .. }) if status.ready => {
                            outstanding.insert(id);
                            let _ = requests.send(b.to_vec());
                        }
                        Ok(Frame::Request { id, .. }) => {
                            send(&mut ws, &Frame::Failed {
                                id,
                                code: FailCode::Unavailable,
                                message: status.reason.clone().unwrap_or_else(|| "not ready".into()),
                            }).await;
                        }
                        Ok(_) => {
                            tracing::warn!("ignoring a frame from the gateway that is not a request");
                        }
                        Err(e) => {
                            if let Some(id) = Frame::peek_id(&b) {
                                send(&mut ws, &Frame::Failed {
                                    id,
                                    code: FailCode::BadRequest,
                                    message: e.0,
                                }).await;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    tracing::warn!("lost the gateway connection; dialling again");
                    ws = None;
                    // A connection that lived a while resets the backoff; one the gateway
                    // keeps closing at once (ejected, barred) backs off further.
                    if connected_at.elapsed() > Duration::from_secs(10) {
                        dial_backoff = Duration::from_millis(200);
                    } else {
                        dial_backoff = (dial_backoff * 2).min(Duration::from_secs(5));
                    }
                    // The gateway failed what it had sent over this connection over to
                    // other replicas; the runner's late answers are dropped.
                    outstanding.clear();
                    next_dial = tokio::time::Instant::now() + dial_backoff;
                }
                Some(Ok(_)) => {} // ping/pong: tungstenite answers pings itself
            },
            _ = tokio::time::sleep_until(next_dial), if ws.is_none() && drain_until.is_none() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)), if drain_until.is_some() => {}
            _ = &mut shutdown, if drain_until.is_none() => {
                tracing::info!(in_flight = outstanding.len(), "draining the replica");
                status.draining = true;
                send(&mut ws, &Frame::Status(status.clone())).await;
                drain_until = Some(tokio::time::Instant::now() + opts.drain_grace);
                if ws.is_none() {
                    outstanding.clear();
                }
            }
        }
    }
    if let Some(mut w) = ws.take() {
        let _ = w.close(None).await;
    }
    let _ = stop_tx.send(true);
    let _ = supervisor.await;
}
