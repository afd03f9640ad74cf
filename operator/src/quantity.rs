//! Parsing Kubernetes quantities (`500m`, `2`, `16Gi`, `1e3`) for placement arithmetic.
//! Resource sizes only; money never goes through here.

use edgeloom_crds::schema::Quantity;

/// The value of a quantity in base units (cores, bytes), or `None` if malformed.
pub fn value(q: &str) -> Option<f64> {
    let q = q.trim();
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

/// CPU in millicores (rounded up).
pub fn millicores(q: Option<&Quantity>) -> u64 {
    q.and_then(|q| value(&q.as_string()))
        .map(|v| (v * 1000.0).ceil().max(0.0) as u64)
        .unwrap_or(0)
}

/// Bytes as MiB (rounded up).
pub fn mebibytes(q: Option<&Quantity>) -> u64 {
    q.and_then(|q| value(&q.as_string()))
        .map(|v| (v / (1024.0 * 1024.0)).ceil().max(0.0) as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kubernetes_forms() {
        assert_eq!(millicores(Some(&Quantity::Int(2))), 2000);
        assert_eq!(millicores(Some(&"500m".into())), 500);
        assert_eq!(millicores(Some(&"1.5".into())), 1500);
        assert_eq!(mebibytes(Some(&"16Gi".into())), 16384);
        assert_eq!(mebibytes(Some(&"512Mi".into())), 512);
        assert_eq!(mebibytes(Some(&"1e9".into())), 954);
        assert_eq!(value("12x"), None);
        assert_eq!(millicores(None), 0);
    }
}
