//! A provider's gluetun server list (`spec.serverList`): read from its ConfigMap (the user's, or
//! for a `url` the operator's `<provider>-server-list`, refreshed from the URL and kept while a
//! fetch fails), filtered by the Secret's `SERVER_*` variables, reported in status; and, for a
//! mask's copy of the credentials, its servers as `<hostname>.conf` files
//! (`cloak_model::serverlist::files`).

use std::collections::BTreeMap;

use cloak_api::{ServerListSource, ServerListStatus, VpnProvider};
use cloak_model::serverlist::{self, ServerList};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Secret},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams},
};

use crate::{Context, MANAGER, Result};

/// Annotations of the operator's copy of a fetched list.
const URL: &str = "cloak.dev/server-list-url";
const FETCHED: &str = "cloak.dev/fetched-at";
const ATTEMPTED: &str = "cloak.dev/attempted-at";
const HASH: &str = "cloak.dev/sha256";
const FETCH_ERROR: &str = "cloak.dev/fetch-error";
/// A failed fetch is tried again after this long.
const RETRY: std::time::Duration = std::time::Duration::from_mins(1);
/// The default `refreshInterval`.
pub(crate) const REFRESH: std::time::Duration = std::time::Duration::from_hours(24);
/// A list larger than this is refused (gluetun's whole file is about 2 MB).
const MAX_FETCH: usize = 32 << 20;

/// The ConfigMap and key the list is read from: the user's, or the operator's copy of a URL's.
pub(crate) fn location(provider: &str, source: &ServerListSource) -> (String, String) {
    match &source.config_map {
        Some(cm) => (cm.name.clone(), cm.key.clone()),
        None => (
            cloak_model::names::server_list(provider),
            "servers.json".into(),
        ),
    }
}

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

/// The list from its ConfigMap, the ConfigMap's resourceVersion and its annotations.
async fn load(
    ctx: &Context,
    namespace: &str,
    (name, key): &(String, String),
) -> Read<(ServerList, String, BTreeMap<String, String>)> {
    let Some(map) = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace)
        .get_opt(name)
        .await?
    else {
        return Ok(Err(format!("ConfigMap {namespace}/{name} not found")));
    };
    let bytes = map
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|text| text.as_bytes().to_vec())
        .or_else(|| {
            map.binary_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|b| b.0.clone())
        });
    let Some(bytes) = bytes else {
        return Ok(Err(format!(
            "ConfigMap {namespace}/{name} has no key {key:?}"
        )));
    };
    let annotations = map.annotations().clone();
    Ok(serverlist::parse(&bytes)
        .map(|list| {
            (
                list,
                map.resource_version().unwrap_or_default(),
                annotations,
            )
        })
        .map_err(|e| format!("ConfigMap {namespace}/{name} {key:?}: {e}")))
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
    let variables = variables(secret);
    let where_ = location(&provider.name_any(), source);
    if let Some(url) = &source.url {
        if source.config_map.is_some() {
            return Ok(Err("give configMap or url, not both".into()));
        }
        refresh(provider, url, source, &variables, &where_, ctx).await?;
    } else if source.config_map.is_none() {
        return Ok(Err("give configMap or url".into()));
    }
    let (list, version, annotations) = match load(ctx, &ns, &where_).await? {
        Ok(read) => read,
        Err(why) => {
            // A URL never fetched well: the last fetch's error says why.
            let fetch = source
                .url
                .as_ref()
                .and_then(|_| last_error(provider, ctx))
                .map(|(e, _)| e);
            return Ok(Err(fetch.unwrap_or(why)));
        }
    };
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
        source: format!("configmap/{}/{}@{version}", where_.0, where_.1),
        fetched: annotations
            .get(FETCHED)
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map(Time),
        hash: annotations.get(HASH).cloned(),
        fetch_error: annotations
            .get(FETCH_ERROR)
            .filter(|e| !e.is_empty())
            .cloned(),
    }))
}

/// The servers as `<hostname>.conf` files, for a mask's copy of the provider's Secret.
pub(crate) async fn files(
    ctx: &Context,
    namespace: &str,
    provider: &str,
    source: &ServerListSource,
    secret: &Secret,
) -> Read<BTreeMap<String, Vec<u8>>> {
    let (list, _, _) = match load(ctx, namespace, &location(provider, source)).await? {
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

/// The error of the last failed fetch, kept in memory for a list that was never fetched well
/// (there is no ConfigMap to keep it in).
fn last_error(provider: &VpnProvider, ctx: &Context) -> Option<(String, std::time::Instant)> {
    let key = provider.uid().unwrap_or_default();
    ctx.fetch_errors.lock().ok()?.get(&key).cloned()
}

fn remember_error(provider: &VpnProvider, ctx: &Context, error: Option<String>) {
    let key = provider.uid().unwrap_or_default();
    if let Ok(mut errors) = ctx.fetch_errors.lock() {
        match error {
            Some(e) => {
                errors.insert(key, (e, std::time::Instant::now()));
            }
            None => {
                errors.remove(&key);
            }
        }
    }
}

/// Fetches `url` again when due (never fetched, another URL, `refreshInterval` passed, and no
/// failed attempt within the last minute) and keeps the provider's section in the operator's
/// ConfigMap. A failed fetch leaves the last good copy in place and records why.
async fn refresh(
    provider: &VpnProvider,
    url: &str,
    source: &ServerListSource,
    variables: &BTreeMap<String, String>,
    (name, key): &(String, String),
    ctx: &Context,
) -> Result<()> {
    let ns = provider.namespace().unwrap_or_default();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let current = api.get_opt(name).await?;
    let annotation = |k: &str| {
        current
            .as_ref()
            .and_then(|c| c.annotations().get(k).cloned())
    };
    let age = |k: &str| {
        annotation(k)
            .and_then(|t| t.parse::<Timestamp>().ok())
            .and_then(|t| std::time::Duration::try_from(Timestamp::now().duration_since(t)).ok())
    };
    let interval = source
        .refresh_interval
        .as_ref()
        .map_or(REFRESH, cloak_api::GoDuration::get);
    let same_url = annotation(URL).as_deref() == Some(url);
    let stale = age(FETCHED).is_none_or(|a| a >= interval);
    let failed = annotation(FETCH_ERROR).is_some_and(|e| !e.is_empty());
    let tried = failed && age(ATTEMPTED).is_some_and(|a| a < RETRY);
    if same_url && (!stale || tried) {
        return Ok(());
    }
    let failed_lately = last_error(provider, ctx).is_some_and(|(_, at)| at.elapsed() < RETRY);
    if current.is_none() && failed_lately {
        return Ok(());
    }
    let now = Timestamp::now().to_string();
    let provider_name = variables
        .get("VPN_SERVICE_PROVIDER")
        .cloned()
        .unwrap_or_default();
    let fetched = fetch(url).await.and_then(|bytes| {
        let hash = hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
        serverlist::section_only(&bytes, &provider_name)
            .map(|trimmed| (trimmed, hash))
            .map_err(|e| e.to_string())
    });
    let owner = provider.controller_owner_ref(&()).unwrap_or_default();
    let params = PatchParams::apply(MANAGER).force();
    match fetched {
        Ok((trimmed, hash)) => {
            remember_error(provider, ctx, None);
            let map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    owner_references: Some(vec![owner]),
                    annotations: Some(BTreeMap::from([
                        (URL.into(), url.to_owned()),
                        (FETCHED.into(), now.clone()),
                        (ATTEMPTED.into(), now),
                        (HASH.into(), hash),
                    ])),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    key.clone(),
                    String::from_utf8_lossy(&trimmed).into_owned(),
                )])),
                ..ConfigMap::default()
            };
            api.patch(name, &params, &Patch::Apply(&map)).await?;
            tracing::info!(provider = %provider.name_any(), url, "server list fetched");
        }
        Err(why) => {
            let why = format!("fetching {url} failed: {why}");
            tracing::warn!(provider = %provider.name_any(), "{why}");
            remember_error(provider, ctx, Some(why.clone()));
            if let (Some(current), true) = (current, same_url) {
                // The last good copy stays; the attempt and its error are recorded beside it,
                // applied by the same manager, so the next good fetch's apply removes the error.
                let mut annotations = current.annotations().clone();
                annotations.insert(ATTEMPTED.into(), now);
                annotations.insert(FETCH_ERROR.into(), why);
                annotations.retain(|k, _| {
                    [URL, FETCHED, ATTEMPTED, HASH, FETCH_ERROR].contains(&k.as_str())
                });
                let map = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(ns.clone()),
                        owner_references: Some(vec![owner]),
                        annotations: Some(annotations),
                        ..ObjectMeta::default()
                    },
                    data: current.data,
                    ..ConfigMap::default()
                };
                api.patch(name, &params, &Patch::Apply(&map)).await?;
            }
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// One GET: a 2xx answer's body, at most [`MAX_FETCH`] bytes, within 30 s. Redirects are not
/// followed (give the final URL).
async fn fetch(url: &str) -> std::result::Result<Vec<u8>, String> {
    use http_body_util::{BodyExt, Empty, Limited};
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("only http:// and https:// URLs are fetched".into());
    }
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("no TLS root certificates: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<hyper::body::Bytes>>(connector);
    let request = http::Request::get(uri)
        .header("user-agent", "cloak-operator")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let work = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_FETCH)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), work)
        .await
        .map_err(|_| "no answer within 30 s".to_owned())?
}
