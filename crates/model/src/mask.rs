//! A mask's phase and message, decided from plain values: the slot it holds (if any), how many
//! pods use it, and why allocation is waiting (if it is). The controller reads these, calls
//! [`phase`], and writes what it returns.

use cloak_api::{AssignedProvider, MaskPhase};

/// What allocation found when the mask holds no slot: the phase to report and why.
pub type Waiting = (MaskPhase, String);

/// The mask's phase and its message.
///
/// - holding a slot: `Active` while pods use it, otherwise `Ready`;
/// - holding none: what allocation reported (`Waiting`, `ErrNoProviders`, ...), or `Pending`
///   while it has not reported yet.
pub fn phase(held: Option<&AssignedProvider>, users: usize, waiting: Option<Waiting>) -> Waiting {
    match (held, waiting) {
        (Some(held), _) if users > 0 => (
            MaskPhase::Active,
            format!(
                "slot {} of {}/{} in use by {users} pod(s)",
                held.slot, held.namespace, held.name
            ),
        ),
        (Some(held), _) => (
            MaskPhase::Ready,
            format!(
                "slot {} of {}/{} ready; credentials in Secret {}",
                held.slot, held.namespace, held.name, held.secret
            ),
        ),
        (None, Some(waiting)) => waiting,
        (None, None) => (MaskPhase::Pending, "allocating".into()),
    }
}

/// Whether the mask counts as Ready (its `Ready` condition).
pub fn is_ready(phase: MaskPhase) -> bool {
    matches!(phase, MaskPhase::Ready | MaskPhase::Active)
}

/// Whether entering `next` from `previous` is told as a Normal Event: the phases a user waits
/// on, once each time they begin.
pub fn announce(previous: Option<MaskPhase>, next: MaskPhase) -> bool {
    previous != Some(next) && matches!(next, MaskPhase::ErrNoProviders | MaskPhase::Waiting)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held() -> AssignedProvider {
        AssignedProvider {
            name: "vpn".into(),
            namespace: "net".into(),
            uid: "u".into(),
            slot: 3,
            secret: "m-vpn-credentials".into(),
        }
    }

    #[test]
    fn a_held_slot_is_active_while_pods_use_it_and_ready_otherwise() {
        assert_eq!(
            phase(Some(&held()), 2, None),
            (
                MaskPhase::Active,
                "slot 3 of net/vpn in use by 2 pod(s)".into()
            )
        );
        let (ready, message) = phase(Some(&held()), 0, None);
        assert_eq!(ready, MaskPhase::Ready);
        assert_eq!(
            message,
            "slot 3 of net/vpn ready; credentials in Secret m-vpn-credentials"
        );
        assert!(is_ready(MaskPhase::Active) && is_ready(MaskPhase::Ready));
    }

    #[test]
    fn without_a_slot_the_allocators_reason_is_the_phase() {
        let waiting = (MaskPhase::Waiting, "every slot is taken".to_owned());
        assert_eq!(phase(None, 5, Some(waiting.clone())), waiting);
        assert_eq!(
            phase(None, 0, None),
            (MaskPhase::Pending, "allocating".into())
        );
        assert!(!is_ready(MaskPhase::Waiting));
    }

    #[test]
    fn waiting_phases_are_announced_once_when_they_begin() {
        assert!(announce(Some(MaskPhase::Ready), MaskPhase::Waiting));
        assert!(announce(None, MaskPhase::ErrNoProviders));
        assert!(!announce(Some(MaskPhase::Waiting), MaskPhase::Waiting));
        assert!(!announce(Some(MaskPhase::Pending), MaskPhase::Ready));
    }
}
