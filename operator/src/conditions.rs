//! Status conditions merged so that `lastTransitionTime` moves only when a condition's
//! status really changes.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Sets condition `type_` in `conditions`, keeping its transition time unless the status
/// changes.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let message: String = message.chars().take(1000).collect();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Time(now);
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: Time(now),
        }),
    }
}

/// The condition of `type_`, if present.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let t1: Timestamp = "2026-01-01T00:00:00Z".parse().expect("t1");
        let t2: Timestamp = "2026-01-01T00:01:00Z".parse().expect("t2");
        let mut cs = Vec::new();
        set(
            &mut cs,
            "Scheduled",
            false,
            "Unschedulable",
            "no room",
            Some(1),
            t1,
        );
        set(
            &mut cs,
            "Scheduled",
            false,
            "Unschedulable",
            "still no room",
            Some(1),
            t2,
        );
        assert_eq!(cs[0].last_transition_time, Time(t1));
        assert_eq!(cs[0].message, "still no room");
        set(&mut cs, "Scheduled", true, "Placed", "", Some(1), t2);
        assert_eq!(cs[0].last_transition_time, Time(t2));
        assert_eq!(cs.len(), 1);
    }
}
