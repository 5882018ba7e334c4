//! The verification pod of a provider and how to read its outcome.
//!
//! Two kinds, chosen by the credentials' format ([`Verifier`]):
//! - gluetun's variables: three containers sharing an `emptyDir`: `init` records the unmasked
//!   public address, `vpn` (gluetun, with the mask's copy of the credentials as environment)
//!   connects, and `probe` exits 0 once the public address differs from the recorded one.
//! - native credentials (`wg0.conf`, `config.ovpn`): one container, `probe`, running
//!   `cloak agent verify` from the operator's own image with the credentials mounted: the
//!   agent's own tunnel and kill switch, so a provider is Ready exactly when the agent can use
//!   its credentials. It exits 0 once its probe answers through the tunnel, or 1 with the
//!   agent's reason in its termination message.
//!
//! Either way the outcome is read from the `probe` container, not the pod phase.

use cloak_api::VerifyOverrides;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};

use crate::merge::merge;

/// Label carried by a verification pod and mask: the provider's name.
pub const LABEL_PROVIDER: &str = "cloak.dev/verify-provider";

/// Inputs of [`pod`], all plain values.
#[derive(Debug, Clone)]
pub struct VerifyPod<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub provider: &'a str,
    /// The Secret holding the credentials (the verification mask's copy).
    pub secret: &'a str,
    /// A URL answering with the caller's public address in plain text.
    pub ip_url: &'a str,
    /// Owners: the provider (controller) and the mask (blocks its deletion while the pod exists).
    pub owners: Vec<OwnerReference>,
    pub overrides: Option<&'a VerifyOverrides>,
    pub verifier: Verifier<'a>,
}

/// What verifies the credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verifier<'a> {
    /// gluetun, for gluetun's variables.
    Gluetun,
    /// `cloak agent verify` in `image` (the operator's own), for native credentials; the
    /// tunnel must pass its probe within `timeout_secs`.
    Agent { image: &'a str, timeout_secs: u64 },
}

impl Verifier<'_> {
    /// The verifier for credentials of `format`.
    pub fn for_format(
        format: crate::credentials::Format,
        image: &str,
        timeout_secs: u64,
    ) -> Verifier<'_> {
        match format {
            crate::credentials::Format::Gluetun => Verifier::Gluetun,
            crate::credentials::Format::WgQuick | crate::credentials::Format::Ovpn => {
                Verifier::Agent {
                    image,
                    timeout_secs,
                }
            }
        }
    }
}

/// Builds the verification pod with the user's overrides merged in.
pub fn pod(input: &VerifyPod<'_>) -> Result<Pod, serde_json::Error> {
    if let Verifier::Agent {
        image,
        timeout_secs,
    } = input.verifier
    {
        return agent_pod(input, image, timeout_secs);
    }
    let curl = "curlimages/curl:8.11.1";
    let mut init = json!({
        "name": "init", "image": curl,
        "command": ["sh", "-c", "curl -fsS --max-time 20 \"$IP_URL\" > /shared/ip"],
        "env": [{"name": "IP_URL", "value": input.ip_url}],
        "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
    });
    let mut vpn = json!({
        "name": "vpn", "image": "qmcgaw/gluetun:latest",
        "envFrom": [{"secretRef": {"name": input.secret}}],
        "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
    });
    // Bounded: 90 tries 2 s apart; verify.timeout usually ends it first.
    let mut probe = json!({
        "name": "probe", "image": curl,
        "command": ["sh", "-c", "initial=$(cat /shared/ip); i=0; while [ $i -lt 90 ]; do ip=$(curl -fsS --max-time 5 \"$IP_URL\") && [ -n \"$ip\" ] && [ \"$ip\" != \"$initial\" ] && exit 0; i=$((i+1)); sleep 2; done; exit 1"],
        "env": [{"name": "IP_URL", "value": input.ip_url}],
        "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
    });
    let containers = input.overrides.and_then(|o| o.containers.as_ref());
    for (container, patch) in [
        (&mut init, containers.and_then(|c| c.init.as_ref())),
        (&mut vpn, containers.and_then(|c| c.vpn.as_ref())),
        (&mut probe, containers.and_then(|c| c.probe.as_ref())),
    ] {
        if let Some(patch) = patch {
            merge(container, patch);
        }
    }
    finish(
        input,
        json!({
            "restartPolicy": "Never",
            "initContainers": [init],
            "containers": [vpn, probe],
            "volumes": [{"name": "shared", "emptyDir": {}}],
        }),
    )
}

/// The pod around `spec`: name, labels, owners, then the user's pod overrides.
fn finish(input: &VerifyPod<'_>, spec: Value) -> Result<Pod, serde_json::Error> {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": input.name, "namespace": input.namespace,
            "labels": {LABEL_PROVIDER: input.provider, "app.kubernetes.io/managed-by": "cloak"},
            "ownerReferences": input.owners,
        },
    });
    pod["spec"] = spec;
    if let Some(patch) = input.overrides.and_then(|o| o.pod.as_ref()) {
        merge(&mut pod, patch);
    }
    serde_json::from_value(pod)
}

/// The native verification pod: `cloak agent verify` with the credentials mounted, NET_ADMIN for
/// its firewall and routes, and `/dev/net/tun` for a userspace WireGuard or OpenVPN tunnel.
fn agent_pod(
    input: &VerifyPod<'_>,
    image: &str,
    timeout_secs: u64,
) -> Result<Pod, serde_json::Error> {
    let mut probe = json!({
        "name": "probe", "image": image,
        "args": ["agent", "verify", "--credentials", "/var/run/cloak/credentials",
                 "--probe", input.ip_url, "--timeout", timeout_secs.to_string()],
        "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "credentials", "mountPath": "/var/run/cloak/credentials", "readOnly": true},
            {"name": "tun", "mountPath": "/dev/net/tun"},
        ],
    });
    if let Some(patch) = input
        .overrides
        .and_then(|o| o.containers.as_ref())
        .and_then(|c| c.probe.as_ref())
    {
        merge(&mut probe, patch);
    }
    finish(
        input,
        json!({
            "restartPolicy": "Never",
            "containers": [probe],
            "volumes": [
                {"name": "credentials", "secret": {"secretName": input.secret}},
                {"name": "tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}},
            ],
        }),
    )
}

/// What a verification pod's status says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Running,
    Passed,
    Failed(String),
}

/// Reads the outcome from the `probe` container (or a failed pod).
pub fn outcome(status: Option<&PodStatus>) -> Outcome {
    let Some(status) = status else {
        return Outcome::Running;
    };
    let probe = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == "probe");
    if let Some(done) = probe
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
    {
        return if done.exit_code == 0 {
            Outcome::Passed
        } else {
            let why = done
                .message
                .as_deref()
                .or(done.reason.as_deref())
                .unwrap_or("public address did not change");
            Outcome::Failed(format!("probe exited with {}: {why}", done.exit_code))
        };
    }
    if status.phase.as_deref() == Some("Failed") {
        let why = status
            .message
            .as_deref()
            .or(status.reason.as_deref())
            .unwrap_or("pod failed");
        return Outcome::Failed(why.to_owned());
    }
    Outcome::Running
}

/// A JSON value of the pod, for tests and logs that need the raw shape.
pub fn to_value(pod: &Pod) -> Value {
    serde_json::to_value(pod).unwrap_or(Value::Null)
}

/// What a provider's verification does next, before anything is read from the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Decided without a verification pod: report `phase` with `message`; look again after
    /// `requeue` when set.
    Report {
        phase: cloak_api::ProviderPhase,
        message: String,
        requeue: Option<std::time::Duration>,
    },
    /// Verify now (a pod of this format's verifier).
    Verify(crate::credentials::Format),
}

/// What the previous status says, for [`first_step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Previous<'a> {
    pub phase: Option<cloak_api::ProviderPhase>,
    pub message: Option<&'a str>,
    /// Time since the last successful verification, if there was one.
    pub since_verified: Option<std::time::Duration>,
    /// The spec generation and Secret version the status was written for equal today's.
    pub same_spec_and_secret: bool,
}

/// The first step of a verification, from plain values: skipped, refused credentials, not due
/// yet (with when it will be), a failure not to retry until the spec or the Secret changes, or
/// verify now.
pub fn first_step(
    skip: bool,
    credentials: impl FnOnce() -> Result<
        crate::credentials::Summary,
        crate::credentials::CredentialsError,
    >,
    secret: &str,
    interval: Option<std::time::Duration>,
    previous: Previous<'_>,
) -> Step {
    use cloak_api::ProviderPhase;
    let report = |phase, message: String, requeue| Step::Report {
        phase,
        message,
        requeue,
    };
    if skip {
        return report(ProviderPhase::Ready, "verification skipped".into(), None);
    }
    // Classified only when verification is not skipped: it reads the Secret's values.
    let format = match credentials() {
        Ok(found) => found.format,
        Err(e) => {
            return report(
                ProviderPhase::ErrVerifyFailed,
                format!("Secret {secret}: {e}"),
                None,
            );
        }
    };
    let due = match (previous.since_verified, interval) {
        (None, _) => true,
        (Some(since), Some(interval)) => since >= interval,
        (Some(_), None) => false,
    };
    if !due {
        let next = match (previous.since_verified, interval) {
            (Some(since), Some(interval)) => interval.checked_sub(since),
            _ => None,
        };
        return report(ProviderPhase::Ready, "credentials verified".into(), next);
    }
    // A failed verification is not retried until the spec or the Secret changes (a new
    // interval is a spec change too).
    if previous.phase == Some(ProviderPhase::ErrVerifyFailed) && previous.same_spec_and_secret {
        return report(
            ProviderPhase::ErrVerifyFailed,
            previous.message.unwrap_or_default().to_owned(),
            None,
        );
    }
    Step::Verify(format)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloak_api::ContainerOverrides;

    fn input(overrides: Option<&VerifyOverrides>) -> VerifyPod<'_> {
        VerifyPod {
            name: "p-verify",
            namespace: "vpn",
            provider: "p",
            secret: "p-verify-vpn-credentials",
            ip_url: "https://ip.example/",
            owners: vec![],
            overrides,
            verifier: Verifier::Gluetun,
        }
    }

    #[test]
    fn native_credentials_are_verified_by_the_agent_with_the_secret_mounted() {
        let mut native = input(None);
        native.verifier = Verifier::for_format(
            crate::credentials::Format::WgQuick,
            "cloak.dev/lab/cloak:dev",
            45,
        );
        let pod = to_value(&pod(&native).unwrap());
        let containers = pod["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "one container: {pod}");
        let probe = &containers[0];
        assert_eq!(
            probe["name"], "probe",
            "the outcome is read from the probe container"
        );
        assert_eq!(probe["image"], "cloak.dev/lab/cloak:dev");
        assert_eq!(
            probe["args"],
            json!([
                "agent",
                "verify",
                "--credentials",
                "/var/run/cloak/credentials",
                "--probe",
                "https://ip.example/",
                "--timeout",
                "45"
            ])
        );
        assert!(
            probe.get("envFrom").is_none(),
            "native credentials are never environment"
        );
        assert_eq!(
            pod["spec"]["volumes"][0]["secret"]["secretName"],
            "p-verify-vpn-credentials"
        );
        assert!(pod["spec"]["initContainers"].is_null());
        assert_eq!(
            Verifier::for_format(crate::credentials::Format::Gluetun, "x", 1),
            Verifier::Gluetun
        );
    }

    #[test]
    fn the_pod_has_init_vpn_and_probe_with_the_credentials_as_environment() {
        let pod = to_value(&pod(&input(None)).unwrap());
        assert_eq!(pod["spec"]["initContainers"][0]["name"], "init");
        assert_eq!(
            pod["spec"]["containers"][0]["envFrom"][0]["secretRef"]["name"],
            "p-verify-vpn-credentials"
        );
        assert_eq!(pod["spec"]["containers"][1]["name"], "probe");
        assert_eq!(pod["spec"]["restartPolicy"], "Never");
    }

    #[test]
    fn overrides_merge_onto_the_pod_and_each_container() {
        let overrides = VerifyOverrides {
            pod: Some(json!({"metadata": {"labels": {"mylabel": "v"}}})),
            containers: Some(ContainerOverrides {
                vpn: Some(json!({"image": "qmcgaw/gluetun:v3", "imagePullPolicy": "Always"})),
                ..ContainerOverrides::default()
            }),
        };
        let pod = to_value(&pod(&input(Some(&overrides))).unwrap());
        assert_eq!(pod["metadata"]["labels"]["mylabel"], "v");
        assert_eq!(pod["metadata"]["labels"][LABEL_PROVIDER], "p");
        let vpn = &pod["spec"]["containers"][0];
        assert_eq!(vpn["image"], "qmcgaw/gluetun:v3");
        assert_eq!(vpn["imagePullPolicy"], "Always");
        assert_eq!(
            vpn["envFrom"][0]["secretRef"]["name"],
            "p-verify-vpn-credentials"
        );
        assert_eq!(
            pod["spec"]["containers"][1]["image"],
            "curlimages/curl:8.11.1"
        );
    }

    #[test]
    fn the_outcome_is_read_from_the_probe_container() {
        let status = |probe: Value| -> PodStatus {
            serde_json::from_value(json!({"phase": "Running", "containerStatuses": [
                {"name": "vpn", "ready": true, "restartCount": 0, "image": "g", "imageID": "", "state": {"running": {}}},
                {"name": "probe", "ready": false, "restartCount": 0, "image": "c", "imageID": "", "state": probe}]}))
            .unwrap()
        };
        assert_eq!(outcome(None), Outcome::Running);
        assert_eq!(
            outcome(Some(&status(json!({"running": {}})))),
            Outcome::Running
        );
        assert_eq!(
            outcome(Some(&status(json!({"terminated": {"exitCode": 0}})))),
            Outcome::Passed
        );
        assert!(
            matches!(outcome(Some(&status(json!({"terminated": {"exitCode": 1}})))), Outcome::Failed(m) if m.contains("exited with 1"))
        );
    }

    mod first_step {
        use std::time::Duration;

        use cloak_api::{ProviderPhase, TunnelKind};

        use super::super::*;
        use crate::credentials::{CredentialsError, Format, Summary};

        const OVPN: Summary = Summary {
            format: Format::Ovpn,
            tunnel: TunnelKind::OpenVpn,
        };

        fn never_verified() -> Previous<'static> {
            Previous {
                phase: None,
                message: None,
                since_verified: None,
                same_spec_and_secret: false,
            }
        }

        #[test]
        fn skipped_or_refused_credentials_are_reported_without_a_pod() {
            assert_eq!(
                first_step(true, || Ok(OVPN), "creds", None, never_verified()),
                Step::Report {
                    phase: ProviderPhase::Ready,
                    message: "verification skipped".into(),
                    requeue: None
                }
            );
            assert_eq!(
                first_step(
                    false,
                    || Err(CredentialsError::Empty),
                    "creds",
                    None,
                    never_verified()
                ),
                Step::Report {
                    phase: ProviderPhase::ErrVerifyFailed,
                    message: format!("Secret creds: {}", CredentialsError::Empty),
                    requeue: None
                }
            );
            assert_eq!(
                first_step(false, || Ok(OVPN), "creds", None, never_verified()),
                Step::Verify(Format::Ovpn)
            );
        }

        #[test]
        fn a_verified_provider_is_verified_again_only_once_its_interval_is_up() {
            let verified = |since: u64| Previous {
                phase: Some(ProviderPhase::Ready),
                message: Some("credentials verified"),
                since_verified: Some(Duration::from_secs(since)),
                same_spec_and_secret: true,
            };
            let hour = Some(Duration::from_hours(1));
            assert_eq!(
                first_step(false, || Ok(OVPN), "creds", hour, verified(600)),
                Step::Report {
                    phase: ProviderPhase::Ready,
                    message: "credentials verified".into(),
                    requeue: Some(Duration::from_mins(50))
                }
            );
            assert_eq!(
                first_step(false, || Ok(OVPN), "creds", hour, verified(3600)),
                Step::Verify(Format::Ovpn)
            );
            assert!(
                matches!(
                    first_step(false, || Ok(OVPN), "creds", None, verified(86_400)),
                    Step::Report { requeue: None, .. }
                ),
                "no interval: verified once"
            );
        }

        #[test]
        fn a_failure_is_retried_only_when_the_spec_or_the_secret_changed() {
            let failed = |same| Previous {
                phase: Some(ProviderPhase::ErrVerifyFailed),
                message: Some("no wireguard handshake"),
                since_verified: None,
                same_spec_and_secret: same,
            };
            assert_eq!(
                first_step(false, || Ok(OVPN), "creds", None, failed(true)),
                Step::Report {
                    phase: ProviderPhase::ErrVerifyFailed,
                    message: "no wireguard handshake".into(),
                    requeue: None
                }
            );
            assert_eq!(
                first_step(false, || Ok(OVPN), "creds", None, failed(false)),
                Step::Verify(Format::Ovpn)
            );
        }
    }
}
