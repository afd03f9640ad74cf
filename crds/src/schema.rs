//! Schema fragments shared by the API types: Kubernetes quantities, exact decimals,
//! and names, each with the validation the API server enforces.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The pattern an exact non-negative decimal must match: digits, optionally a point and
/// up to 18 fractional digits. Money in edgeloom is never a floating-point number.
pub const DECIMAL_PATTERN: &str = r"^(0|[1-9][0-9]{0,17})(\.[0-9]{1,18})?$";

/// A Kubernetes resource quantity (`16Gi`, `500m`, `2`), kept as the user wrote it.
///
/// The schema accepts an integer or a string; the API server checks strings with CEL's
/// `isQuantity` and integers for sign, so a bad value is rejected at admission.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum Quantity {
    /// A plain count (`cpu: 2`).
    Int(i64),
    /// A suffixed quantity (`memory: 4Gi`).
    Str(String),
}

impl Quantity {
    /// The value in base units (cores, bytes), or `None` if malformed. For resource
    /// arithmetic only; money never goes through here.
    pub fn value(&self) -> Option<f64> {
        let text = self.as_string();
        let q = text.trim();
        let split = q
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
            .unwrap_or(q.len());
        let (num, suffix) = q.split_at(split);
        let n: f64 = num.parse().ok()?;
        let mult = match suffix {
            "" => 1.0,
            "m" => 1e-3,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "E" => 1e18,
            "Ki" => 1024.0,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            "Ei" => 1024f64.powi(6),
            s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse::<i32>().ok()?),
            _ => return None,
        };
        let v = n * mult;
        v.is_finite().then_some(v)
    }

    /// CPU in millicores, rounded up.
    pub fn millicores(&self) -> Option<u64> {
        self.value().map(|v| (v * 1000.0).ceil().max(0.0) as u64)
    }

    /// Bytes as MiB, rounded up.
    pub fn mebibytes(&self) -> Option<u64> {
        self.value()
            .map(|v| (v / (1024.0 * 1024.0)).ceil().max(0.0) as u64)
    }

    /// The quantity as Kubernetes would print it.
    pub fn as_string(&self) -> String {
        match self {
            Quantity::Int(i) => i.to_string(),
            Quantity::Str(s) => s.clone(),
        }
    }
}

impl From<&str> for Quantity {
    fn from(s: &str) -> Self {
        Quantity::Str(s.to_string())
    }
}

impl JsonSchema for Quantity {
    fn schema_name() -> Cow<'static, str> {
        "Quantity".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A Kubernetes quantity such as 2, 500m or 16Gi.",
            "x-kubernetes-int-or-string": true,
            "x-kubernetes-validations": [{
                "rule": "type(self) == int ? self >= 0 : (size(self) <= 64 && isQuantity(self) && !quantity(self).isLessThan(quantity('0')))",
                "message": "must be a non-negative Kubernetes quantity such as 2, 500m or 16Gi"
            }]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_in_every_kubernetes_form() {
        assert_eq!(Quantity::Int(2).millicores(), Some(2000));
        assert_eq!(Quantity::from("500m").millicores(), Some(500));
        assert_eq!(Quantity::from("1.5").millicores(), Some(1500));
        assert_eq!(Quantity::from("16Gi").mebibytes(), Some(16384));
        assert_eq!(Quantity::from("512Mi").mebibytes(), Some(512));
        assert_eq!(Quantity::from("1e9").mebibytes(), Some(954));
        assert_eq!(Quantity::from("12x").value(), None);
    }
}

/// An exact non-negative decimal written as a string (`"0.000125"`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct Decimal(pub String);

impl JsonSchema for Decimal {
    fn schema_name() -> Cow<'static, str> {
        "Decimal".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "An exact non-negative decimal written as a string, e.g. \"0.000125\" (at most 18 fractional digits). Never a floating-point number.",
            "type": "string",
            "maxLength": 40,
            "pattern": DECIMAL_PATTERN,
        })
    }
}

/// Schema for a DNS-1123 label (names of member clusters, pools, datasets).
pub fn dns_label(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 63,
        "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
    })
}

/// Schema for a list of DNS-1123 labels used as a set.
pub fn dns_label_set(generator: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": 64,
        "items": dns_label(generator),
        "x-kubernetes-list-type": "set",
    })
}

/// Schema for a short free-form name (GPU products, regions, zones).
pub fn short_string_set(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": 32,
        "items": {"type": "string", "minLength": 1, "maxLength": 128},
        "x-kubernetes-list-type": "set",
    })
}

/// Schema for a map of Kubernetes label keys to values.
pub fn label_map(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": 32,
        "additionalProperties": {"type": "string", "maxLength": 63},
        "x-kubernetes-validations": [{
            "rule": "self.all(k, size(k) <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))",
            "message": "keys must be Kubernetes label keys (optional DNS prefix and '/', then up to 63 characters)"
        }]
    })
}
