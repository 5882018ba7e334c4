//! What the node does about one pod sandbox, from what the pod is to the gateways now and what
//! the node did to it last: pure, so every case is a literal in a unit test. The daemon asks at
//! the sandbox's ADD and again whenever the pod, a gateway or the node's state changes, so a pod
//! relabelled onto a gateway (or off it), or matched by a selector written after it started, is
//! attached or detached while it runs.

/// What a pod is to the gateways now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want<G> {
    /// A client of this gateway.
    Client(G),
    /// No gateway's client: its network is its own.
    NotClient,
    /// It is to be a client and cannot be (it names a gateway that does not exist, or one that
    /// cannot be read may choose it): a new pod does not start, a running one is cut off.
    Refused(String),
}

/// What the node does about one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// It is as it should be.
    Keep,
    /// Attach it to this gateway (after detaching it from another one, if `detach_first`).
    Attach { gateway: String, detach_first: bool },
    /// Detach it: it is no client any more.
    Detach,
    /// Cut it off (detached first when it was attached) and say why.
    CutOff { why: String, detach_first: bool },
    /// It was cut off and is no client any more: lift the cut.
    Lift,
}

/// The step for a sandbox that is `attached` to a gateway (its name) or not, and `cut_off` or
/// not, when the pod is `want` now. `gateway_name` names a wanted gateway.
pub fn step<G>(
    want: &Want<G>,
    gateway_name: impl Fn(&G) -> String,
    attached: Option<&str>,
    cut_off: bool,
) -> Step {
    match (want, attached) {
        (Want::Client(g), Some(now)) if gateway_name(g) == now => Step::Keep,
        (Want::Client(g), now) => Step::Attach {
            gateway: gateway_name(g),
            detach_first: now.is_some(),
        },
        (Want::NotClient, Some(_)) => Step::Detach,
        (Want::NotClient, None) if cut_off => Step::Lift,
        (Want::NotClient, None) => Step::Keep,
        (Want::Refused(_), None) if cut_off => Step::Keep,
        (Want::Refused(why), now) => Step::CutOff {
            why: why.clone(),
            detach_first: now.is_some(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step_of(want: &Want<&str>, attached: Option<&str>, cut_off: bool) -> Step {
        step(want, |g| (*g).to_owned(), attached, cut_off)
    }

    #[test]
    fn a_pod_that_becomes_a_client_is_attached_and_one_that_stops_is_detached() {
        assert_eq!(
            step_of(&Want::Client("egress"), None, false),
            Step::Attach {
                gateway: "egress".into(),
                detach_first: false
            }
        );
        assert_eq!(
            step_of(&Want::Client("egress"), Some("egress"), false),
            Step::Keep
        );
        assert_eq!(
            step_of(&Want::NotClient, Some("egress"), false),
            Step::Detach
        );
        assert_eq!(step_of(&Want::NotClient, None, false), Step::Keep);
    }

    #[test]
    fn a_pod_moved_to_another_gateway_leaves_the_first_before_it_joins_the_second() {
        assert_eq!(
            step_of(&Want::Client("other"), Some("egress"), false),
            Step::Attach {
                gateway: "other".into(),
                detach_first: true
            }
        );
    }

    #[test]
    fn a_running_pod_that_cannot_be_attached_is_cut_off_once_and_freed_when_it_is_no_client() {
        let refused = Want::Refused("gateway nowhere does not exist".into());
        assert_eq!(
            step_of(&refused, Some("egress"), false),
            Step::CutOff {
                why: "gateway nowhere does not exist".into(),
                detach_first: true
            }
        );
        assert_eq!(
            step_of(&refused, None, false),
            Step::CutOff {
                why: "gateway nowhere does not exist".into(),
                detach_first: false
            }
        );
        assert_eq!(step_of(&refused, None, true), Step::Keep);
        assert_eq!(step_of(&Want::NotClient, None, true), Step::Lift);
        // A cut-off pod whose gateway appears is attached (the attachment replaces the cut).
        assert_eq!(
            step_of(&Want::Client("nowhere"), None, true),
            Step::Attach {
                gateway: "nowhere".into(),
                detach_first: false
            }
        );
    }
}
