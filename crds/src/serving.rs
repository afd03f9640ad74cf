//! The serving wire format and the replica credential (docs/ARCHITECTURE.md, "Serving"),
//! shared by the gateway, the agent and the serving runner.
//!
//! One [`Frame`] is the unit everywhere: on the runner's stdin/stdout pipe each frame is
//! preceded by its length (u32, little-endian); in a WebSocket binary message between the
//! agent and the gateway the message is the frame. Tensors travel as float32,
//! little-endian, row-major, with their shape.
//!
//! A [`Credential`] is what lets an agent's outbound connection serve one replica: the
//! operator signs the claims with its ed25519 key and the gateway checks them with the
//! public key alone, so a gateway (or anyone who reads its configuration) cannot mint one,
//! and a node cannot claim another replica, endpoint, account or region than it was given.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Most dimensions a tensor may have on the wire.
pub const MAX_DIMS: usize = 8;
/// Largest frame accepted (64 MiB): a length prefix above it is a broken peer, not a tensor.
pub const MAX_FRAME: usize = 64 << 20;
/// Largest status frame (its reason is cut by [`brief`] long before this).
pub const MAX_STATUS: usize = 4096;
/// Bytes of a tensor frame besides its values: kind, id, ndim and up to [`MAX_DIMS`] dims.
pub const FRAME_HEADER: usize = 1 + 8 + 1 + 4 * MAX_DIMS;

/// Why a request failed, as the runner or the agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailCode {
    /// The request does not fit the model (shape, size): the caller's fault, never retried.
    BadRequest = 1,
    /// The model failed on a well-formed batch.
    Model = 2,
    /// The replica cannot answer now (runner restarting, draining): retried elsewhere.
    Unavailable = 3,
}

impl FailCode {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::BadRequest,
            2 => Self::Model,
            3 => Self::Unavailable,
            _ => return None,
        })
    }
}

/// A replica's state, as its agent (or runner) tells it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// The model is loaded and answers.
    pub ready: bool,
    /// The replica takes no new requests and closes once the ones in flight are answered.
    #[serde(default)]
    pub draining: bool,
    /// The shape of one output row (the runner learns it from a warm-up pass).
    #[serde(default)]
    pub output_shape: Vec<u32>,
    /// Why the replica is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One message of the serving protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// Rows to run: `shape[0]` rows of `shape[1..]` each.
    Request {
        id: u64,
        shape: Vec<u32>,
        data: Vec<f32>,
    },
    /// The outputs for request `id`, one row per input row.
    Reply {
        id: u64,
        shape: Vec<u32>,
        data: Vec<f32>,
    },
    /// Request `id` failed.
    Failed {
        id: u64,
        code: FailCode,
        message: String,
    },
    /// The replica's state.
    Status(ReplicaStatus),
}

const REQUEST: u8 = 1;
const REPLY: u8 = 2;
const FAILED: u8 = 3;
const STATUS: u8 = 4;

/// Why bytes are not a frame.
#[derive(Debug, PartialEq, Eq)]
pub struct WireError(pub String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

fn tensor_len(shape: &[u32]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d as usize))
        .filter(|n| *n <= MAX_FRAME / 4)
}

impl Frame {
    /// The request id the frame answers or carries (none for a status).
    pub fn id(&self) -> Option<u64> {
        match self {
            Frame::Request { id, .. } | Frame::Reply { id, .. } | Frame::Failed { id, .. } => {
                Some(*id)
            }
            Frame::Status(_) => None,
        }
    }

    /// A request's bytes, straight from borrowed rows (no copy into a [`Frame`]).
    pub fn request_bytes(id: u64, shape: &[u32], data: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 8 + 1 + 4 * shape.len() + 4 * data.len());
        out.push(REQUEST);
        out.extend_from_slice(&id.to_le_bytes());
        out.push(shape.len() as u8);
        for d in shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
        for v in data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// The frame's bytes (without a length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Frame::Request { id, shape, data } | Frame::Reply { id, shape, data } => {
                out.reserve(1 + 8 + 1 + 4 * shape.len() + 4 * data.len());
                out.push(if matches!(self, Frame::Request { .. }) {
                    REQUEST
                } else {
                    REPLY
                });
                out.extend_from_slice(&id.to_le_bytes());
                out.push(shape.len() as u8);
                for d in shape {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                for v in data {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Frame::Failed { id, code, message } => {
                out.push(FAILED);
                out.extend_from_slice(&id.to_le_bytes());
                out.push(*code as u8);
                out.extend_from_slice(message.as_bytes());
            }
            Frame::Status(s) => {
                out.push(STATUS);
                out.extend_from_slice(&serde_json::to_vec(s).unwrap_or_default());
            }
        }
        out
    }

    /// Reads a frame from its bytes; every inconsistency is an error that says what.
    pub fn decode(b: &[u8]) -> Result<Frame, WireError> {
        let err = |m: &str| Err(WireError(m.to_string()));
        let Some((&kind, rest)) = b.split_first() else {
            return err("empty frame");
        };
        if kind == STATUS {
            if rest.len() > MAX_STATUS {
                return Err(WireError(format!(
                    "a status frame holds at most {MAX_STATUS} bytes, this one {}",
                    rest.len()
                )));
            }
            let s: ReplicaStatus = serde_json::from_slice(rest)
                .map_err(|e| WireError(format!("status frame: {e}")))?;
            if s.output_shape.len() >= MAX_DIMS {
                return Err(WireError(format!(
                    "outputShape has {} dimensions; a row has at most {}",
                    s.output_shape.len(),
                    MAX_DIMS - 1
                )));
            }
            return Ok(Frame::Status(s));
        }
        if rest.len() < 8 {
            return err("frame shorter than its id");
        }
        let id = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let rest = &rest[8..];
        match kind {
            REQUEST | REPLY => {
                let Some((&dims, rest)) = rest.split_first() else {
                    return err("tensor frame without a shape");
                };
                let dims = dims as usize;
                if dims == 0 || dims > MAX_DIMS {
                    return Err(WireError(format!(
                        "a tensor needs 1 to {MAX_DIMS} dimensions, not {dims}"
                    )));
                }
                if rest.len() < 4 * dims {
                    return err("frame shorter than its shape");
                }
                let shape: Vec<u32> = rest[..4 * dims]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                let body = &rest[4 * dims..];
                let Some(n) = tensor_len(&shape) else {
                    return Err(WireError(format!("shape {shape:?} is too large")));
                };
                if body.len() != 4 * n {
                    return Err(WireError(format!(
                        "shape {shape:?} needs {n} float32 values, the frame holds {} bytes",
                        body.len()
                    )));
                }
                let data = body
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                Ok(if kind == REQUEST {
                    Frame::Request { id, shape, data }
                } else {
                    Frame::Reply { id, shape, data }
                })
            }
            FAILED => {
                let Some((&code, msg)) = rest.split_first() else {
                    return err("failure frame without a code");
                };
                Ok(Frame::Failed {
                    id,
                    code: FailCode::from_u8(code)
                        .ok_or_else(|| WireError(format!("unknown failure code {code}")))?,
                    message: String::from_utf8_lossy(msg).into_owned(),
                })
            }
            k => Err(WireError(format!("unknown frame kind {k}"))),
        }
    }

    /// Writes the frame with its length prefix (the pipe form).
    pub fn write_to(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        let body = self.encode();
        w.write_all(&(body.len() as u32).to_le_bytes())?;
        w.write_all(&body)
    }

    /// Reads one length-prefixed frame; `Ok(None)` at a clean end of the stream. A frame
    /// that does not decode is `Ok(Some(Err(..)))`: the stream is still in step.
    pub fn read_from(
        r: &mut impl std::io::Read,
    ) -> std::io::Result<Option<Result<Frame, WireError>>> {
        Ok(read_body(r)?.map(|b| Frame::decode(&b)))
    }

    /// The request id in a frame's bytes, when they are long enough to hold one (to answer
    /// a frame that does not decode).
    pub fn peek_id(b: &[u8]) -> Option<u64> {
        (b.len() >= 9 && b[0] != STATUS)
            .then(|| u64::from_le_bytes(b[1..9].try_into().expect("8 bytes")))
    }
}

/// Reads one length-prefixed frame's bytes; `Ok(None)` at a clean end of the stream.
pub fn read_body(r: &mut impl std::io::Read) -> std::io::Result<Option<Vec<u8>>> {
    {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
            ));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        Ok(Some(body))
    }
}

/// A failure's text cut to what a client or a status should carry: libtorch errors carry
/// a whole TorchScript traceback (with the node's file paths); keep its first and last
/// lines, at most 400 characters.
pub fn brief(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let text = match lines.as_slice() {
        [] => String::new(),
        [one] => one.to_string(),
        [first, .., last] => format!("{first} ... {last}"),
    };
    if text.chars().count() > 400 {
        text.chars().take(399).chain(std::iter::once('…')).collect()
    } else {
        text
    }
}

/// How the agent starts `edgeloom-runner serve` (the JSON in its second argument).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServeConfig {
    /// The TorchScript file (already fetched and checked by the agent).
    pub model: String,
    /// The shape of one input row; a request is `[rows, ..inputShape]`.
    pub input_shape: Vec<u32>,
    /// Most rows in one forward pass.
    pub max_batch: u32,
    /// Longest a request waits for others to join its batch, in microseconds.
    pub max_delay_micros: u64,
    /// libtorch intra-op threads (0: libtorch's default).
    #[serde(default)]
    pub threads: u32,
    /// `cpu`, `cuda`, or none for CUDA when present.
    #[serde(default)]
    pub device: Option<String>,
    /// `fp32` (default), `fp16` or `bf16`: the precision the model runs in on CUDA (inputs
    /// and outputs stay float32 on the wire).
    #[serde(default)]
    pub precision: Option<String>,
}

/// What a replica credential grants: serving replica `replica` of endpoint
/// `namespace/endpoint` from node `node` (in member `cluster`, region `region`), paid to
/// `account`, until `expires` (Unix seconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claims {
    pub namespace: String,
    pub endpoint: String,
    pub replica: String,
    pub node: String,
    pub cluster: String,
    #[serde(default)]
    pub region: String,
    pub account: String,
    pub expires: u64,
}

/// Domain separation: a credential signature can never be replayed as another statement
/// the operator signs (ledger checkpoints).
const CREDENTIAL_DOMAIN: &[u8] = b"edgeloom serving credential v1\n";

/// A signed [`Claims`]; its text form is `<hex claims JSON>.<hex signature>`.
pub struct Credential;

impl Credential {
    /// Signs `claims` with the operator's key.
    pub fn issue(claims: &Claims, key: &SigningKey) -> String {
        let body = serde_json::to_vec(claims).unwrap_or_default();
        let mut msg = CREDENTIAL_DOMAIN.to_vec();
        msg.extend_from_slice(&body);
        let sig = key.sign(&msg);
        format!("{}.{}", to_hex(&body), to_hex(&sig.to_bytes()))
    }

    /// The claims of `token` when `key` signed it and it has not expired at `now`.
    pub fn verify(token: &str, key: &VerifyingKey, now: u64) -> Result<Claims, String> {
        let (body, sig) = token
            .split_once('.')
            .ok_or("a credential is <claims>.<signature>")?;
        let body = from_hex(body).ok_or("the credential's claims are not hex")?;
        let sig: [u8; 64] = from_hex(sig)
            .and_then(|s| s.try_into().ok())
            .ok_or("the credential's signature is not 64 bytes of hex")?;
        let mut msg = CREDENTIAL_DOMAIN.to_vec();
        msg.extend_from_slice(&body);
        key.verify(&msg, &Signature::from_bytes(&sig))
            .map_err(|_| "the credential's signature does not hold (altered or forged)")?;
        let claims: Claims =
            serde_json::from_slice(&body).map_err(|e| format!("credential claims: {e}"))?;
        if claims.expires <= now {
            return Err(format!(
                "the credential expired at {} (now {now})",
                claims.expires
            ));
        }
        Ok(claims)
    }
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Request {
                id: 7,
                shape: vec![2, 3],
                data: vec![1.0, -2.5, 3.0, 0.0, f32::MAX, 1e-30],
            },
            Frame::Reply {
                id: u64::MAX,
                shape: vec![1, 10],
                data: (0..10).map(|i| i as f32).collect(),
            },
            Frame::Failed {
                id: 3,
                code: FailCode::BadRequest,
                message: "input shape [1, 65] is not [N, 64]".into(),
            },
            Frame::Status(ReplicaStatus {
                ready: true,
                draining: false,
                output_shape: vec![10],
                reason: None,
            }),
        ];
        for f in frames {
            assert_eq!(Frame::decode(&f.encode()), Ok(f.clone()));
            let mut pipe = Vec::new();
            f.write_to(&mut pipe).unwrap();
            let mut r = &pipe[..];
            assert_eq!(Frame::read_from(&mut r).unwrap(), Some(Ok(f)));
            assert_eq!(Frame::read_from(&mut r).unwrap(), None);
        }
    }

    #[test]
    fn broken_frames_say_what_is_wrong() {
        let good = Frame::Request {
            id: 1,
            shape: vec![2, 2],
            data: vec![0.0; 4],
        }
        .encode();
        let short = &good[..good.len() - 4];
        assert!(
            Frame::decode(short)
                .unwrap_err()
                .0
                .contains("needs 4 float32")
        );
        assert!(Frame::decode(&[]).unwrap_err().0.contains("empty"));
        assert!(
            Frame::decode(&[9; 12])
                .unwrap_err()
                .0
                .contains("unknown frame kind 9")
        );
        let mut zero_dims = good[..9].to_vec();
        zero_dims.push(0);
        assert!(
            Frame::decode(&zero_dims)
                .unwrap_err()
                .0
                .contains("1 to 8 dimensions")
        );
        // A huge shape is refused before anything is allocated.
        let mut huge = good[..9].to_vec();
        huge.push(2);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Frame::decode(&huge).unwrap_err().0.contains("too large"));
        // A status is small and its row shape has at most 7 dimensions.
        let mut big = vec![4u8];
        big.extend_from_slice(
            &serde_json::to_vec(&ReplicaStatus {
                ready: true,
                output_shape: vec![0; 3000],
                ..Default::default()
            })
            .unwrap(),
        );
        assert!(
            Frame::decode(&big)
                .unwrap_err()
                .0
                .contains("at most 4096 bytes")
        );
        let wide = Frame::Status(ReplicaStatus {
            ready: true,
            output_shape: vec![1; 8],
            ..Default::default()
        });
        assert!(
            Frame::decode(&wide.encode())
                .unwrap_err()
                .0
                .contains("at most 7")
        );
        // An oversized length prefix is an I/O error, not an allocation.
        let mut r = &(u32::MAX.to_le_bytes())[..];
        assert!(Frame::read_from(&mut r).is_err());
    }

    fn claims() -> Claims {
        Claims {
            namespace: "ml".into(),
            endpoint: "digits".into(),
            replica: "digits-0".into(),
            node: "edge-a-node-0".into(),
            cluster: "edge-a".into(),
            region: "eu".into(),
            account: "alice".into(),
            expires: 2_000,
        }
    }

    #[test]
    fn credentials_hold_only_as_signed_and_in_time() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let token = Credential::issue(&claims(), &key);
        assert_eq!(
            Credential::verify(&token, &key.verifying_key(), 1_000),
            Ok(claims())
        );
        assert!(
            Credential::verify(&token, &key.verifying_key(), 2_000)
                .unwrap_err()
                .contains("expired")
        );
        // Another key's signature does not hold.
        let other = SigningKey::from_bytes(&[8; 32]);
        assert!(
            Credential::verify(&token, &other.verifying_key(), 1_000)
                .unwrap_err()
                .contains("does not hold")
        );
        // A node that rewrites its claims (another replica, account or region) breaks the
        // signature.
        let (_, sig) = token.split_once('.').unwrap();
        for forged in [
            Claims {
                replica: "digits-1".into(),
                ..claims()
            },
            Claims {
                account: "mallory".into(),
                ..claims()
            },
            Claims {
                region: "us".into(),
                ..claims()
            },
        ] {
            let body = to_hex(&serde_json::to_vec(&forged).unwrap());
            assert!(
                Credential::verify(&format!("{body}.{sig}"), &key.verifying_key(), 1_000)
                    .unwrap_err()
                    .contains("does not hold")
            );
        }
        assert!(Credential::verify("nonsense", &key.verifying_key(), 0).is_err());
    }

    #[test]
    fn brief_keeps_the_first_and_last_lines() {
        assert_eq!(brief("one line"), "one line");
        assert_eq!(
            brief("The following operation failed\n  at x.py:3\n\nRuntimeError: mat1 and mat2\n"),
            "The following operation failed ... RuntimeError: mat1 and mat2"
        );
        assert_eq!(brief(&"x".repeat(1000)).chars().count(), 400);
    }
}
