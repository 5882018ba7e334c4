//! A provider's gluetun server list (`spec.serverList`): read from its ConfigMap, filtered by the
//! Secret's `SERVER_*` variables, reported in status; and, for a mask's copy of the
//! credentials, its servers as `<hostname>.conf` files (`cloak_model::serverlist::files`).

use std::collections::BTreeMap;

use cloak_api::{ServerListSource, ServerListStatus, VpnProvider};
use cloak_model::serverlist::{self, ServerList};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Secret},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{Api, ResourceExt};

use crate::{Context, Result};

/// A Secret holds at most 1 MiB; the copy's other keys and metadata need a little room.
const COPY_LIMIT: usize = 1_000_000;

/// The list as read, or why it cannot be used (a message for the provider's status).
pub(crate) type Read<T> = Result<std::result::Result<T, String>>;

/// The Secret's variables (gluetun's), as text.
pub(crate) fn variables(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).trim().to_owned()))
        .collect()
}

/// The list from its ConfigMap, and the ConfigMap's resourceVersion.
async fn load(
    ctx: &Context,
    namespace: &str,
    source: &ServerListSource,
) -> Read<(ServerList, String)> {
    let cm = &source.config_map;
    let Some(map) = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace)
        .get_opt(&cm.name)
        .await?
    else {
        return Ok(Err(format!("ConfigMap {namespace}/{} not found", cm.name)));
    };
    let bytes = map
        .data
        .as_ref()
        .and_then(|d| d.get(&cm.key))
        .map(|text| text.as_bytes().to_vec())
        .or_else(|| {
            map.binary_data
                .as_ref()
                .and_then(|d| d.get(&cm.key))
                .map(|b| b.0.clone())
        });
    let Some(bytes) = bytes else {
        return Ok(Err(format!(
            "ConfigMap {namespace}/{} has no key {:?}",
            cm.name, cm.key
        )));
    };
    Ok(serverlist::parse(&bytes)
        .map(|list| (list, map.resource_version().unwrap_or_default()))
        .map_err(|e| format!("ConfigMap {namespace}/{} {:?}: {e}", cm.name, cm.key)))
}

/// What the provider's list gives with its Secret: the status to report and a version (the
/// ConfigMap's) that changes whenever the list does.
pub(crate) async fn read(
    provider: &VpnProvider,
    source: &ServerListSource,
    secret: &Secret,
    ctx: &Context,
) -> Read<ServerListStatus> {
    let ns = provider.namespace().unwrap_or_default();
    let (list, version) = match load(ctx, &ns, source).await? {
        Ok(read) => read,
        Err(why) => return Ok(Err(why)),
    };
    let variables = variables(secret);
    let section = match serverlist::select(&list, &variables) {
        Ok((section, _)) => section,
        Err(e) => return Ok(Err(e.to_string())),
    };
    // The files a mask's copy will hold: what is counted is what the agent gets.
    let files = match serverlist::files(&list, &variables) {
        Ok(files) => files,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let size = files.values().map(|f| f.expose().len()).sum::<usize>()
        + secret
            .data
            .iter()
            .flatten()
            .map(|(_, v)| v.0.len())
            .sum::<usize>();
    if size > COPY_LIMIT {
        return Ok(Err(format!(
            "its {} servers make a credentials copy of {size} bytes, more than a Secret holds \
             (1 MiB): narrow the pool with SERVER_COUNTRIES, SERVER_CITIES, ...",
            files.len()
        )));
    }
    if !list.skipped.is_empty() {
        tracing::debug!(provider = %provider.name_any(), skipped = ?list.skipped, "parts of the server list were skipped");
    }
    let timestamp = list.sections.get(section).map_or(0, |s| s.timestamp);
    Ok(Ok(ServerListStatus {
        servers: u32::try_from(files.len()).unwrap_or(u32::MAX),
        updated: (timestamp > 0)
            .then(|| Timestamp::from_second(timestamp).ok())
            .flatten()
            .map(Time),
        source: format!(
            "configmap/{}/{}@{version}",
            source.config_map.name, source.config_map.key
        ),
    }))
}

/// The servers as `<hostname>.conf` files, for a mask's copy of the provider's Secret.
pub(crate) async fn files(
    ctx: &Context,
    namespace: &str,
    source: &ServerListSource,
    secret: &Secret,
) -> Read<BTreeMap<String, Vec<u8>>> {
    let (list, _) = match load(ctx, namespace, source).await? {
        Ok(read) => read,
        Err(why) => return Ok(Err(why)),
    };
    Ok(serverlist::files(&list, &variables(secret))
        .map(|files| {
            files
                .into_iter()
                .map(|(k, v)| (k, v.expose().as_bytes().to_vec()))
                .collect()
        })
        .map_err(|e| e.to_string()))
}
