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
const SECTION: &str = "cloak.dev/server-list-provider";
const FETCHED: &str = "cloak.dev/fetched-at";
const HASH: &str = "cloak.dev/sha256";
/// A failed fetch is tried again after this long.
const RETRY: std::time::Duration = std::time::Duration::from_mins(1);
/// The default `refreshInterval`.
pub(crate) const REFRESH: std::time::Duration = std::time::Duration::from_hours(24);
/// The shortest `refreshInterval` honoured.
pub(crate) const MIN_REFRESH: std::time::Duration = std::time::Duration::from_mins(1);
/// A list larger than this is refused (gluetun's whole file is about 2 MB).
const MAX_FETCH: usize = 32 << 20;
/// A ConfigMap holds at most 1 MiB.
const MAX_SECTION: usize = 1_000_000;

/// A provider's last fetch, kept in memory: nothing is written while a URL fails, so a failing
/// URL costs one request a minute and no write.
#[derive(Debug, Clone)]
pub(crate) struct Fetch {
    url: String,
    section: String,
    checked: std::time::Instant,
    error: Option<String>,
}

/// The refresh interval of a source, never under [`MIN_REFRESH`].
pub(crate) fn refresh_interval(source: &ServerListSource) -> std::time::Duration {
    source
        .refresh_interval
        .as_ref()
        .map_or(REFRESH, cloak_api::GoDuration::get)
        .max(MIN_REFRESH)
}

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
    } else {
        forget(provider, ctx);
    }
    let fetch_error = source
        .url
        .as_ref()
        .and_then(|url| last_fetch(provider, url, ctx))
        .and_then(|f| f.error);
    let (list, version, annotations) = match load(ctx, &ns, &where_).await? {
        Ok(read) => read,
        // A URL never fetched well: the fetch's error says why.
        Err(why) => return Ok(Err(fetch_error.unwrap_or(why))),
    };
    // A copy of another URL's list, or of another provider's section, is not this one's.
    if let Some(url) = &source.url {
        let section = variables.get("VPN_SERVICE_PROVIDER").map(String::as_str);
        if annotations.get(URL).map(String::as_str) != Some(url.as_str())
            || annotations.get(SECTION).map(String::as_str) != section
        {
            return Ok(Err(
                fetch_error.unwrap_or_else(|| format!("{url} not fetched yet"))
            ));
        }
    }
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
        fetch_error,
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

/// The last fetch of `provider`'s list from `url`, if it was of that URL.
fn last_fetch(provider: &VpnProvider, url: &str, ctx: &Context) -> Option<Fetch> {
    let key = provider.uid().unwrap_or_default();
    let fetches = ctx.fetches.lock().ok()?;
    fetches.get(&key).filter(|f| f.url == url).cloned()
}

/// Forgets a provider's fetches (deleted, or no longer fetching).
pub(crate) fn forget(provider: &VpnProvider, ctx: &Context) {
    if let Ok(mut fetches) = ctx.fetches.lock() {
        fetches.remove(&provider.uid().unwrap_or_default());
    }
}

/// Fetches `url` again when due: never fetched (by this operator) or its section's provider
/// changed, or `refreshInterval` passed, or a minute after a failure. A good list whose
/// provider's section differs from the copy's is written to the operator's ConfigMap; a failure
/// is only remembered, and the last good copy stays in use.
async fn refresh(
    provider: &VpnProvider,
    url: &str,
    source: &ServerListSource,
    variables: &BTreeMap<String, String>,
    (name, key): &(String, String),
    ctx: &Context,
) -> Result<()> {
    let section = variables
        .get("VPN_SERVICE_PROVIDER")
        .cloned()
        .unwrap_or_default();
    let due = match last_fetch(provider, url, ctx) {
        Some(last) if last.section == section => {
            let wait = if last.error.is_some() {
                RETRY
            } else {
                refresh_interval(source)
            };
            last.checked.elapsed() >= wait
        }
        _ => true,
    };
    if !due {
        return Ok(());
    }
    let ns = provider.namespace().unwrap_or_default();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let current = api.get_opt(name).await?;
    let uid = provider.uid().unwrap_or_default();
    let outcome = match &current {
        Some(c) if !c.owner_references().iter().any(|o| o.uid == uid) => Err(format!(
            "ConfigMap {ns}/{name} exists and is not this provider's: cloak keeps the fetched \
             list there"
        )),
        _ => fetch(url, ctx.config.allow_http_server_lists)
            .await
            .and_then(|bytes| checked(&bytes, &section)),
    };
    let error = match outcome {
        Ok((trimmed, hash)) => {
            let annotation = |k: &str| current.as_ref().and_then(|c| c.annotations().get(k));
            let same = annotation(URL).map(String::as_str) == Some(url)
                && annotation(SECTION) == Some(&section)
                && annotation(HASH) == Some(&hash);
            if !same {
                let map = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(ns.clone()),
                        owner_references: Some(vec![
                            provider.controller_owner_ref(&()).unwrap_or_default(),
                        ]),
                        annotations: Some(BTreeMap::from([
                            (URL.into(), url.to_owned()),
                            (SECTION.into(), section.clone()),
                            (FETCHED.into(), Timestamp::now().to_string()),
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
                api.patch(
                    name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&map),
                )
                .await?;
                tracing::info!(provider = %provider.name_any(), url, "server list fetched");
            }
            None
        }
        Err(why) => {
            let why = format!("fetching {url} failed: {why}");
            tracing::warn!(provider = %provider.name_any(), "{why}");
            Some(why)
        }
    };
    if let Ok(mut fetches) = ctx.fetches.lock() {
        fetches.insert(
            uid,
            Fetch {
                url: url.to_owned(),
                section,
                checked: std::time::Instant::now(),
                error,
            },
        );
    }
    Ok(())
}

/// A fetched list, checked before it replaces a good one: the provider's section (which must
/// read as a list with servers and fit in a ConfigMap), and the SHA-256 of the whole download.
fn checked(bytes: &[u8], section: &str) -> std::result::Result<(Vec<u8>, String), String> {
    let hash = hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    let trimmed = serverlist::section_only(bytes, section).map_err(|e| e.to_string())?;
    let list = serverlist::parse(&trimmed).map_err(|e| e.to_string())?;
    if list.sections.values().all(|s| s.servers.is_empty()) {
        return Err(format!("the list has no server for provider {section:?}"));
    }
    if trimmed.len() > MAX_SECTION {
        return Err(format!(
            "provider {section:?}'s section is {} bytes, more than a ConfigMap holds (1 MiB)",
            trimmed.len()
        ));
    }
    Ok((trimmed, hash))
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
async fn fetch(url: &str, allow_http: bool) -> std::result::Result<Vec<u8>, String> {
    use http_body_util::{BodyExt, Empty, Limited};
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if allow_http => {}
        Some("http") => {
            return Err("only https:// URLs are fetched (the operator's \
                        --allow-http-server-lists allows http://)"
                .into());
        }
        _ => return Err("only https:// URLs are fetched".into()),
    }
    // The Mozilla roots compiled in: the operator's image carries no certificate store.
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
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
