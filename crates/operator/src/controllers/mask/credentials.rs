//! The mask's copy of its provider's credentials, in the mask's namespace and owned by it.

use std::collections::BTreeMap;

use cloak_api::{AssignedProvider, VpnMask};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams},
    runtime::reflector::ObjectRef,
};

use crate::{Context, Error, MANAGER, Result, labels};

/// Copies the provider's credentials into the mask's namespace (owned by the mask), keeping the
/// copy equal to the source: keys removed from the source are removed from the copy. With a
/// server list (`spec.serverList`), the copy also holds its servers as `<hostname>.conf` files,
/// which everything that reads a pool reads as one. The copy
/// records the source's uid and resourceVersion, so an up-to-date copy costs no request at all.
pub(super) async fn sync_secret_copy(
    mask: &VpnMask,
    held: &AssignedProvider,
    ctx: &Context,
) -> Result<()> {
    let provider = ctx.providers.state().into_iter().find_map(|p| {
        p.0.as_ref()
            .ok()
            .filter(|p| p.uid().as_deref() == Some(held.uid.as_str()))
            .cloned()
    });
    let Some(provider) = provider else {
        return Ok(());
    };
    let ns = mask.namespace().unwrap_or_default();
    let cached = |ns: &str, name: &str| ctx.secrets.get(&ObjectRef::new(name).within(ns));
    // A server list's version (its ConfigMap's, as the provider last read it) is part of the
    // source: a new list rewrites the copy's server files.
    let list_version = match (&provider.spec.server_list, provider.status.as_ref()) {
        (Some(list), status) => {
            let (name, key) =
                crate::controllers::provider::serverlist::location(&provider.name_any(), list);
            format!(
                "+list:{name}/{key}:{}",
                status
                    .and_then(|s| s.server_list.as_ref())
                    .map_or("", |l| l.source.as_str())
            )
        }
        (None, _) => String::new(),
    };
    let source_version = cached(&held.namespace, &provider.spec.secret).map(|s| {
        format!(
            "{}/{}{list_version}",
            s.uid().unwrap_or_default(),
            s.resource_version().unwrap_or_default()
        )
    });
    let copy_version = cached(&ns, &held.secret).and_then(|c| {
        let owned = c
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == mask.uid().as_ref());
        owned
            .then(|| c.annotations().get(labels::SOURCE_VERSION).cloned())
            .flatten()
    });
    if source_version.is_some() && source_version == copy_version {
        return Ok(());
    }
    let source = Api::<Secret>::namespaced(ctx.client.clone(), &held.namespace)
        .get_opt(&provider.spec.secret)
        .await?;
    let Some(source) = source else {
        return Err(Error::Invalid(format!(
            "provider {}/{} has no Secret {}",
            held.namespace, held.name, provider.spec.secret
        )));
    };
    let version = format!(
        "{}/{}{list_version}",
        source.uid().unwrap_or_default(),
        source.resource_version().unwrap_or_default()
    );
    let mut data: BTreeMap<String, ByteString> = source
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, ByteString(v.0)))
        .collect();
    if let Some(list) = &provider.spec.server_list {
        match crate::controllers::provider::serverlist::files(
            ctx,
            &held.namespace,
            &held.name,
            list,
            &source,
        )
        .await?
        {
            Ok(files) => data.extend(files.into_iter().map(|(k, v)| (k, ByteString(v)))),
            // The provider reports the list's problem and gives no new slot; a mask that holds
            // one keeps the servers its copy has (its exits keep running), and the rest of the
            // Secret (a rotated key) still reaches it.
            Err(why) => {
                tracing::warn!(mask = %mask.name_any(), provider = %held.name, "server list: {why}; keeping the copy's servers");
                if let Some(old) = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
                    .get_opt(&held.secret)
                    .await?
                {
                    let kept: Vec<(String, ByteString)> = old
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|(k, _)| {
                            std::path::Path::new(k)
                                .extension()
                                .is_some_and(|e| e == "conf")
                                && !data.contains_key(k)
                        })
                        .collect();
                    data.extend(kept);
                }
            }
        }
    }
    let copy = Secret {
        metadata: ObjectMeta {
            name: Some(held.secret.clone()),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([
                (labels::MANAGED_BY.into(), labels::MANAGER.into()),
                (labels::PROVIDER.into(), held.name.clone()),
            ])),
            annotations: Some(BTreeMap::from([(labels::SOURCE_VERSION.into(), version)])),
            owner_references: Some(vec![mask.controller_owner_ref(&()).unwrap_or_default()]),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(ctx.client.clone(), &ns)
        .patch(
            &held.secret,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&copy),
        )
        .await?;
    Ok(())
}

pub(super) async fn delete_secret_copy(ctx: &Context, ns: &str, name: &str) -> Result<()> {
    match Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
