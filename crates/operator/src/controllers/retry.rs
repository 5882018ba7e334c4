//! What a failed reconcile leads to: per-object exponential backoff with a cap, and a Warning
//! Event whose reason is the error's category, published at most once per [`EVENT_INTERVAL`]
//! per object and category (a reconcile retried every few seconds must not flood Events).
//!
//! State is kept only for objects whose last reconcile failed: a success forgets the object.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use kube::{
    api::DynamicObject,
    runtime::{controller::Action, reflector::ObjectRef},
};

use crate::Error;

/// The first retry after a failure; doubles per consecutive failure.
pub(crate) const BASE: Duration = Duration::from_secs(1);
/// The longest wait between retries of a failing object.
pub(crate) const CAP: Duration = Duration::from_mins(5);
/// Cleanup that waits (pods still use a mask) is woken by the pod watch; this only backs up.
const WAITING_CAP: Duration = Duration::from_secs(30);
/// At most one Event per object and category this often.
pub(crate) const EVENT_INTERVAL: Duration = Duration::from_mins(5);

/// `BASE × 2^(failures-1)`, capped.
pub(crate) fn delay(failures: u32, cap: Duration) -> Duration {
    BASE.saturating_mul(1 << failures.saturating_sub(1).min(20))
        .min(cap)
}

/// What to do after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub action: Action,
    /// Publish the error as a Warning Event now.
    pub event: bool,
}

/// Failures per object, shared by both controllers.
#[derive(Debug, Default)]
pub(crate) struct Retries {
    objects: Mutex<HashMap<ObjectRef<DynamicObject>, Failing>>,
}

#[derive(Debug, Default)]
struct Failing {
    failures: u32,
    events: HashMap<&'static str, Instant>,
}

impl Retries {
    /// Records a failure of `object` at `now` and decides what follows.
    pub(crate) fn failed(
        &self,
        object: ObjectRef<DynamicObject>,
        error: &Error,
        now: Instant,
    ) -> Decision {
        let root = error.root();
        let mut objects = self
            .objects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let failing = objects.entry(object).or_default();
        failing.failures = failing.failures.saturating_add(1);
        let action = match root {
            // Retrying cannot help: the next change of the object reconciles it again.
            Error::Invalid(_) => Action::await_change(),
            Error::Waiting(_) => Action::requeue(delay(failing.failures, WAITING_CAP)),
            _ => Action::requeue(delay(failing.failures, CAP)),
        };
        // Waiting is no failure, and an invalid object is reported where it is found (status
        // and its own Event); everything else is told once per interval.
        let event = !matches!(root, Error::Waiting(_) | Error::Invalid(_)) && {
            let category = error.category();
            let due = failing
                .events
                .get(category)
                .is_none_or(|last| now.duration_since(*last) >= EVENT_INTERVAL);
            if due {
                failing.events.insert(category, now);
            }
            due
        };
        Decision { action, event }
    }

    /// The object reconciled: its next failure starts from the shortest backoff.
    pub(crate) fn succeeded(&self, object: &ObjectRef<DynamicObject>) {
        self.objects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(object);
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.objects.lock().map_or(0, |o| o.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str) -> ObjectRef<DynamicObject> {
        ObjectRef::<cloak_api::VpnMask>::new(name)
            .within("ns")
            .erase()
    }

    fn api_error() -> Error {
        Error::Timeout("no answer".into())
    }

    #[test]
    fn failures_back_off_per_object_doubling_up_to_the_cap_and_a_success_resets() {
        let retries = Retries::default();
        let now = Instant::now();
        let waits: Vec<Action> = (0..12)
            .map(|_| retries.failed(object("a"), &api_error(), now).action)
            .collect();
        let secs = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300];
        assert_eq!(waits, secs.map(|s| Action::requeue(Duration::from_secs(s))));
        // Another object has its own count.
        assert_eq!(
            retries.failed(object("b"), &api_error(), now).action,
            Action::requeue(BASE)
        );
        retries.succeeded(&object("a"));
        assert_eq!(
            retries.failed(object("a"), &api_error(), now).action,
            Action::requeue(BASE)
        );
        retries.succeeded(&object("a"));
        retries.succeeded(&object("b"));
        assert_eq!(retries.tracked(), 0, "nothing is kept for healthy objects");
    }

    #[test]
    fn an_invalid_spec_waits_for_a_change_and_waiting_backs_off_to_its_own_cap() {
        let retries = Retries::default();
        let now = Instant::now();
        let invalid = retries.failed(object("a"), &Error::Invalid("bad".into()), now);
        assert_eq!(invalid.action, Action::await_change());
        assert!(!invalid.event, "reported where it is found");
        let waiting = (0..10)
            .map(|_| retries.failed(object("w"), &Error::Waiting("pods".into()), now))
            .last()
            .unwrap();
        assert_eq!(waiting.action, Action::requeue(WAITING_CAP));
        assert!(!waiting.event);
    }

    #[test]
    fn one_event_per_object_and_category_per_interval() {
        let retries = Retries::default();
        let t0 = Instant::now();
        let events = |at: Instant, e: &Error| retries.failed(object("a"), e, at).event;
        assert!(events(t0, &api_error()));
        assert!(!events(t0 + Duration::from_secs(10), &api_error()));
        assert!(
            events(
                t0 + Duration::from_secs(10),
                &Error::Serialize(serde_json::from_str::<u8>("x").unwrap_err())
            ),
            "another category is told at once"
        );
        assert!(events(t0 + EVENT_INTERVAL, &api_error()));
    }
}
