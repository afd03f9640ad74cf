//! Kubernetes Events of the operator (docs/ARCHITECTURE.md, "Status and events").
//!
//! kube's `Recorder` folds events with the same object, type, reason and action into a
//! series and keeps the *first* note: a later "4/4 placed" would show as the first
//! "1/4 placed", and a second cluster's "unreachable" as the first one's. So the action
//! carries a short hash of the note: a repeat of the same note still folds into one series
//! (its count goes up), and a new note is a new event that says what it says.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// The API's limit on an event's note, in bytes.
const NOTE_BYTES: usize = 1024;

/// Publishes one event; a failure is logged, never fatal (events are best effort).
pub async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, NOTE_BYTES).to_string()),
        action: action_for(action, note),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, reference).await {
        tracing::debug!(%reason, error = %e, "publishing event failed");
    }
}

/// `action` plus a 32-bit FNV-1a hash of the note ("Reconcile-1f2e3d4c").
fn action_for(action: &str, note: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in note.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{action}-{h:08x}")
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_note_is_a_new_event_and_a_repeat_folds() {
        assert_eq!(
            action_for("Reconcile", "4/4 placed"),
            action_for("Reconcile", "4/4 placed")
        );
        assert_ne!(
            action_for("Reconcile", "1/4 placed"),
            action_for("Reconcile", "4/4 placed")
        );
        assert!(action_for("Reconcile", &"x".repeat(5000)).len() <= 128);
    }

    #[test]
    fn notes_are_cut_on_a_character_boundary_within_the_limit() {
        let s = "é".repeat(600); // 1200 bytes
        let t = truncate(&s, NOTE_BYTES);
        assert!(t.len() <= NOTE_BYTES && t.len() >= NOTE_BYTES - 1);
        assert_eq!(truncate("short", NOTE_BYTES), "short");
    }
}
