//! A provider's verification: a pod that holds one of the provider's own slots (through a mask
//! pinned to it) runs the credentials, and its outcome becomes the provider's phase.

use std::time::Duration;

use cloak_api::{ProviderPhase, VpnMask, VpnMaskSpec, VpnProvider, VpnProviderStatus};
use cloak_model::{credentials, names, verify};
use k8s_openapi::{
    api::core::v1::{Pod, Secret},
    apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, PostParams},
    runtime::events::EventType,
};

use super::{DEFAULT_TIMEOUT, Decision};
use crate::{Context, Result, controllers::publish};

/// The verification state machine: skip, keep, start, wait, pass or fail.
pub(super) async fn verification(
    provider: &VpnProvider,
    secret: &Secret,
    secret_version: Option<&str>,
    previous: &VpnProviderStatus,
    server_list: bool,
    ctx: &Context,
) -> Result<Decision> {
    let verify_spec = provider.spec.verify.clone().unwrap_or_default();
    let ns = provider.namespace().unwrap_or_default();
    let decide = |phase, message: String, last_verified, requeue| Decision {
        phase,
        message,
        last_verified,
        requeue,
    };
    let classify = || credentials::classify(&crate::secret_bytes(secret), provider.spec.tunnel);
    let now = Timestamp::now();
    let since = |t: &Time| Duration::try_from(now.duration_since(t.0)).unwrap_or_default();
    let step = verify::first_step(
        verify_spec.skip,
        classify,
        &provider.spec.secret,
        verify_spec
            .interval
            .as_ref()
            .map(cloak_api::GoDuration::get),
        verify::Previous {
            phase: previous.phase,
            message: previous.message.as_deref(),
            since_verified: previous.last_verified.as_ref().map(since),
            same_spec_and_secret: previous.observed_generation == provider.meta().generation
                && previous.observed_secret_version.as_deref() == secret_version,
        },
    );
    let format = match step {
        verify::Step::Report {
            phase,
            message,
            requeue,
        } => {
            return Ok(decide(
                phase,
                message,
                previous.last_verified.clone(),
                requeue,
            ));
        }
        // A server list turns gluetun's variables into `<server>.conf` files in the mask's
        // copy: cloak's agent runs them.
        verify::Step::Verify(credentials::Format::Gluetun) if server_list => {
            credentials::Format::WgQuick
        }
        verify::Step::Verify(format) => format,
    };

    let name = names::verification(&provider.name_any());
    let mask = ensure_verification_mask(provider, &name, ctx).await?;
    if mask.meta().deletion_timestamp.is_some() {
        // The previous verification is still releasing its slot.
        return Ok(decide(
            ProviderPhase::Verifying,
            "waiting for the previous verification to end".into(),
            previous.last_verified.clone(),
            Some(Duration::from_secs(1)),
        ));
    }
    let Some(held) = mask.status.as_ref().and_then(|s| s.provider.clone()) else {
        return Ok(decide(
            ProviderPhase::Verifying,
            "waiting for a free slot to verify the credentials".into(),
            previous.last_verified.clone(),
            None,
        ));
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod = if let Some(pod) = pods.get_opt(&name).await? {
        pod
    } else {
        {
            let owners = vec![
                provider.controller_owner_ref(&()).unwrap_or_default(),
                OwnerReference {
                    block_owner_deletion: Some(true),
                    controller: Some(false),
                    ..mask.controller_owner_ref(&()).unwrap_or_default()
                },
            ];
            let pod = verify::pod(&verify::VerifyPod {
                name: &name,
                namespace: &ns,
                provider: &provider.name_any(),
                secret: &held.secret,
                ip_url: &ctx.config.verify_ip_url,
                owners,
                overrides: verify_spec.overrides.as_ref(),
                // The agent gets the verification's whole time but the 10 s it needs to start.
                verifier: verify::Verifier::for_format(
                    format,
                    &ctx.config.agent_image,
                    verify_spec
                        .timeout
                        .as_ref()
                        .map_or(DEFAULT_TIMEOUT, cloak_api::GoDuration::get)
                        .as_secs()
                        .saturating_sub(10)
                        .max(10),
                ),
            })?;
            publish(
                ctx,
                provider,
                EventType::Normal,
                "Verifying",
                format!("verification pod {name} created"),
            )
            .await;
            pods.create(&PostParams::default(), &pod).await?
        }
    };
    let timeout = verify_spec.timeout.map_or(DEFAULT_TIMEOUT, |t| t.get());
    let age = pod
        .creation_timestamp()
        .map_or(Duration::ZERO, |t| since(&t));
    let outcome = match verify::outcome(pod.status.as_ref()) {
        verify::Outcome::Running if age >= timeout => verify::Outcome::Failed(format!(
            "timed out after {}",
            provider
                .spec
                .verify
                .as_ref()
                .and_then(|v| v.timeout.as_ref())
                .map_or_else(|| "1m30s".into(), ToString::to_string)
        )),
        other => other,
    };
    match outcome {
        verify::Outcome::Running => Ok(decide(
            ProviderPhase::Verifying,
            format!("verification pod {name} running"),
            previous.last_verified.clone(),
            Some(timeout.saturating_sub(age)),
        )),
        verify::Outcome::Passed => {
            end_verification(ctx, &ns, &name).await?;
            Ok(decide(
                ProviderPhase::Ready,
                "credentials verified".into(),
                Some(Time(now)),
                verify_spec.interval.map(|i| i.get()),
            ))
        }
        verify::Outcome::Failed(why) => {
            end_verification(ctx, &ns, &name).await?;
            Ok(decide(
                ProviderPhase::ErrVerifyFailed,
                format!("verification failed: {why}"),
                previous.last_verified.clone(),
                None,
            ))
        }
    }
}

pub(super) async fn ensure_verification_mask(
    provider: &VpnProvider,
    name: &str,
    ctx: &Context,
) -> Result<VpnMask> {
    let ns = provider.namespace().unwrap_or_default();
    let api: Api<VpnMask> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(mask) = api.get_opt(name).await? {
        return Ok(mask);
    }
    let mask = VpnMask {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.clone()),
            labels: Some([(verify::LABEL_PROVIDER.to_owned(), provider.name_any())].into()),
            owner_references: Some(vec![provider.controller_owner_ref(&()).unwrap_or_default()]),
            ..ObjectMeta::default()
        },
        spec: VpnMaskSpec::default(),
        status: None,
    };
    Ok(api.create(&PostParams::default(), &mask).await?)
}

/// Deletes the verification pod, then its mask (whose finalizer releases the slot once the pod
/// is gone).
pub(super) async fn end_verification(ctx: &Context, ns: &str, name: &str) -> Result<()> {
    let ignore_missing = |r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        other => other,
    };
    ignore_missing(
        Api::<Pod>::namespaced(ctx.client.clone(), ns)
            .delete(name, &DeleteParams::background())
            .await
            .map(|_| ()),
    )?;
    ignore_missing(
        Api::<VpnMask>::namespaced(ctx.client.clone(), ns)
            .delete(name, &DeleteParams::background())
            .await
            .map(|_| ()),
    )?;
    Ok(())
}
