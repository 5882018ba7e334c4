//! A gateway's exits as Kubernetes objects: the `VpnMask` each exit leases its slot with, the pod
//! that runs `cloak agent` in the exit role with one server of the provider's pool, the agent's
//! config, and each exit's health as its pod shows it. Plain values in, plain values out.
//!
//! ```text
//!  VpnGateway g ──owns──▶ VpnMask g-exit-0 (cloak.dev/vni) ──owns──▶ Pod g-exit-0 (one server)
//!              └─owns──▶ ConfigMap g-exits (one agent config per exit)
//! ```
//!
//! The pod is owned by its mask, as every pod that uses a mask is: deleting the mask deletes
//! the pod first, and the slot is released once the pod is gone.

use std::net::IpAddr;

use cloak_api::ExitHealth;
use ipnet::IpNet;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Pod, Secret},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use serde_json::{Value, json};

use crate::names;

/// On exit masks and pods: the name of the gateway they serve. (Not `cloak.dev/gateway`, the
/// label a client pod chooses its gateway with: an exit is never a client.)
pub const LABEL_GATEWAY: &str = "cloak.dev/exit-of";
/// On exit pods: the exit's name (its mask's).
pub const LABEL_EXIT: &str = "cloak.dev/exit";
/// On exit masks: the exit's VXLAN network identifier, unique among all gateways' exits.
pub const ANNOTATION_VNI: &str = "cloak.dev/vni";
/// On exit pods: the server of the provider's pool the pod connects to. On exit masks: the
/// server the exit's last pod used, so its next pod takes the next one (rotation).
pub const ANNOTATION_SERVER: &str = "cloak.dev/server";
/// On exit pods: what their server's tunnel carries whole (`gateway::tunnel_fit`: its
/// configuration's MTU, or its kind's default, within the pod network less the tunnel's
/// overhead), which a gateway's `mtu: auto` must fit.
pub const ANNOTATION_TUNNEL_MTU: &str = "cloak.dev/tunnel-mtu";
/// Where the exit pod's agent finds its credentials, its config and its admin server.
pub const CREDENTIALS_DIR: &str = "/var/run/cloak/credentials";
pub const CONFIG_DIR: &str = "/etc/cloak";
pub const ADMIN_PORT: u16 = 9090;

/// The agent's admin path that tells its state as JSON, `exitAddress` among it.
pub const STATUS_PATH: &str = "/status";
/// Where an exit pod finds the token its admin server asks for ([`admin_secret_name`], key
/// [`ADMIN_TOKEN_KEY`]).
pub const ADMIN_TOKEN_DIR: &str = "/var/run/cloak/admin";
pub const ADMIN_TOKEN_KEY: &str = "token";
/// The admin Secret's key with the SHA-256 of the cluster's metrics reader token (absent: no
/// reader), beside [`ADMIN_TOKEN_KEY`]; the Secret is mounted whole, so a new hash reaches
/// running exits with the kubelet's next sync.
pub const METRICS_HASH_KEY: &str = "metrics-token-sha256";
/// The same hash on the Secret's metadata: the operator compares it without reading the Secret.
pub const ANNOTATION_METRICS_HASH: &str = "cloak.dev/metrics-token-sha256";

/// The Secret holding a gateway's exits' admin token: what the operator sends to ask an exit
/// for its status, and what no other pod has.
pub fn admin_secret_name(gateway: &str) -> String {
    names::join(&[gateway, "exit-admin"])
}

/// A token's SHA-256, in hex: what an exit is given of the cluster's metrics reader token
/// (`--metrics-token-sha256`), so a tenant who reads its pod spec learns nothing it could send.
pub fn token_sha256(token: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}

/// A new admin token: 32 random bytes, in hex.
pub fn new_admin_token() -> String {
    let mut bytes = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    hex::encode(bytes)
}

/// The admin token Secret of a gateway (owned by it), with `token` and, when the cluster has
/// a metrics reader, its token's hash ([`METRICS_HASH_KEY`]).
pub fn admin_secret(
    gateway: &str,
    namespace: &str,
    owner: &OwnerReference,
    token: &str,
    metrics_hash: Option<&str>,
) -> Result<Secret, serde_json::Error> {
    let mut data = serde_json::Map::new();
    data.insert(ADMIN_TOKEN_KEY.into(), json!(token));
    if let Some(hash) = metrics_hash {
        data.insert(METRICS_HASH_KEY.into(), json!(hash));
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": admin_secret_name(gateway), "namespace": namespace,
            "labels": {LABEL_GATEWAY: gateway, "app.kubernetes.io/managed-by": "cloak"},
            "annotations": {ANNOTATION_METRICS_HASH: metrics_hash.unwrap_or_default()},
            "ownerReferences": [owner],
        },
        "type": "Opaque",
        "stringData": data,
    }))
}

/// The merge patch that sets (or, with None, removes) the metrics reader hash on a gateway's
/// admin Secret, data and annotation together.
pub fn metrics_hash_patch(metrics_hash: Option<&str>) -> Value {
    json!({
        "metadata": {"annotations": {ANNOTATION_METRICS_HASH: metrics_hash.unwrap_or_default()}},
        "stringData": metrics_hash.map(|h| json!({METRICS_HASH_KEY: h})),
        "data": if metrics_hash.is_none() { json!({METRICS_HASH_KEY: null}) } else { Value::Null },
    })
}

/// The public address in an agent's [`STATUS_PATH`] answer (an HTTP/1.0 response or its body):
/// the address its probe saw the tunnel leave with.
pub fn public_address(response: &str) -> Option<IpAddr> {
    let body = response
        .split_once("\r\n\r\n")
        .map_or(response, |(_, body)| body);
    let status: Value = serde_json::from_str(body.trim()).ok()?;
    status.get("exitAddress")?.as_str()?.parse().ok()
}

/// The ConfigMap holding the agent configs of a gateway's exits.
pub fn config_map_name(gateway: &str) -> String {
    names::join(&[gateway, "exits"])
}

/// The key of exit `exit`'s config in [`config_map_name`].
pub fn config_key(exit: &str) -> String {
    format!("{exit}.yaml")
}

/// What an exit's agent is told, besides its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitAgent<'a> {
    pub vni: u32,
    /// TCP MSS clamped on client flows both ways.
    pub mss: u16,
    /// The URL the agent probes through its tunnel (it answers with the public address).
    pub probe: &'a str,
    /// Destinations reached outside the tunnel (the cluster's ranges: the kubelet's probes).
    pub bypass: &'a [IpNet],
    /// Name suffixes the exit's DNS forwarder sends to the cluster DNS (empty: the agent's
    /// default, `cluster.local`).
    pub cluster_domains: &'a [String],
    /// The resolver asked through the tunnel for every other name (`None`: the one in the
    /// exit's credentials).
    pub upstream: Option<IpAddr>,
    /// How long a deleted exit keeps carrying its established flows (`spec.exits.drainGrace`).
    pub drain_grace: std::time::Duration,
    /// The MTU of the exit's end of the links: the pod network's less VXLAN's overhead.
    pub link_mtu: u16,
    /// The MTU the exit's own encrypted packets have room for, when its tunnel runs through
    /// another gateway (a chain's hop: that gateway's client MTU). The agent fits its tunnel
    /// into it, less its kind's overhead. `None`: the pod network, which the credentials fit.
    pub underlay_mtu: Option<u16>,
    /// Inbound ports the exit serves (the gateway's `spec.ports`, resolved).
    pub forwards: &'a [ExitForward],
}

/// One inbound port of an exit, as its agent is told (`exit.forwards`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitForward {
    pub name: String,
    pub protocols: Vec<crate::natpmp::Protocol>,
    /// The Service's cluster address and port.
    pub target: std::net::SocketAddrV4,
    /// The provider's static port for this exit; `None`: NAT-PMP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// When every backend of the Service is a client of this gateway: the backends themselves,
    /// reached over the links with the remote's own address kept (their replies go back
    /// through the exit they came in by); `target` is then unused. Empty: the Service's cluster
    /// address, masqueraded.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
}

/// A backend pod of an inbound port that is a client of the exit's gateway.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// The pod's address and the port it listens on (the Service's target port).
    pub address: std::net::SocketAddrV4,
    /// Its node's transit address ([`crate::gateway::transit_for`]): the exit sends it there
    /// over the node's link.
    pub node: std::net::Ipv4Addr,
}

/// The ports an exit's agent says its provider forwards now (its [`STATUS_PATH`] answer's
/// `forwards`, those with a port), as the gateway's status lists them.
pub fn forwarded_ports(response: &str) -> Vec<cloak_api::ForwardedPort> {
    let mut ports: Vec<cloak_api::ForwardedPort> = forwards_in(response)
        .iter()
        .filter_map(|f| {
            let port = u16::try_from(f.get("port")?.as_u64()?).ok()?;
            let protocol = f.get("protocol")?.as_str()?.to_ascii_uppercase();
            let name = f.get("name")?.as_str()?.to_owned();
            (port != 0 && matches!(protocol.as_str(), "TCP" | "UDP")).then_some(
                cloak_api::ForwardedPort {
                    name,
                    protocol,
                    port,
                },
            )
        })
        .collect();
    ports.sort_by(|a, b| (&a.name, &a.protocol).cmp(&(&b.name, &b.protocol)));
    ports.truncate(64);
    ports
}

/// The requests an exit's agent says it has no port for, with why (its [`STATUS_PATH`]
/// answer's `forwards` with port 0 and an error): `<name>/<PROTOCOL>: <error>`, at most 16,
/// each cut to 200 characters. What a provider that refuses (or a gateway that never answers)
/// looks like from the gateway's status.
pub fn port_failures(response: &str) -> Vec<String> {
    let mut failures: Vec<String> = forwards_in(response)
        .iter()
        .filter(|f| f.get("port").and_then(Value::as_u64) == Some(0))
        .filter_map(|f| {
            let error = f.get("error")?.as_str()?;
            let name = f.get("name")?.as_str()?;
            let protocol = f.get("protocol")?.as_str()?.to_ascii_uppercase();
            let line = format!("{name}/{protocol}: {error}");
            Some(line.chars().take(200).collect())
        })
        .collect();
    failures.sort();
    failures.truncate(16);
    failures
}

/// The `forwards` of an exit's [`STATUS_PATH`] answer (headers and all): none when it is no
/// JSON or says none.
fn forwards_in(response: &str) -> Vec<Value> {
    let body = response
        .split_once("\r\n\r\n")
        .map_or(response, |(_, body)| body);
    match serde_json::from_str::<Value>(body.trim()) {
        Ok(Value::Object(mut status)) => match status.remove("forwards") {
            Some(Value::Array(forwards)) => forwards,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// `spec.exits.drainGrace` when absent.
pub const DEFAULT_DRAIN_GRACE: std::time::Duration = std::time::Duration::from_mins(5);

/// What the kubelet waits past an exit's drain grace before it kills the agent: time to stop.
const STOP_SECONDS: u64 = 10;

/// The drain grace an exit pod was made with (its termination grace period is immutable): what
/// its agent must be told, whatever the gateway's spec says now.
pub fn drain_grace_of(pod: &Pod) -> Option<std::time::Duration> {
    let seconds = pod.spec.as_ref()?.termination_grace_period_seconds?;
    let seconds = u64::try_from(seconds).ok()?.saturating_sub(STOP_SECONDS);
    Some(std::time::Duration::from_secs(seconds))
}

/// The agent config of one exit, as YAML (JSON is YAML). Probes every second and gives up after
/// two failures: an exit that stops carrying traffic must stop answering the nodes' health
/// probes quickly, and a node then moves new flows off it.
pub fn agent_config(exit: &ExitAgent<'_>) -> String {
    let bypass: Vec<String> = exit.bypass.iter().map(ToString::to_string).collect();
    let mut role = json!({
        "vni": exit.vni, "mss": exit.mss, "linkMtu": exit.link_mtu,
        "drainGrace": format!("{}ms", exit.drain_grace.as_millis()),
    });
    if !exit.cluster_domains.is_empty() {
        role["clusterDomains"] = json!(exit.cluster_domains);
    }
    if let Some(mtu) = exit.underlay_mtu {
        role["underlayMtu"] = json!(mtu);
    }
    if !exit.forwards.is_empty() {
        role["forwards"] = json!(exit.forwards);
    }
    let mut config = json!({
        "credentials": CREDENTIALS_DIR,
        "bypass": bypass,
        "health": {"probe": exit.probe, "interval": "1s", "timeout": "1s", "failures": 2},
        "exit": role,
    });
    if let Some(upstream) = exit.upstream {
        config["dns"] = json!(upstream);
    }
    config.to_string()
}

/// The ConfigMap of a gateway's exit configs (`configs`: exit name → [`agent_config`]).
pub fn config_map(
    gateway: &str,
    namespace: &str,
    owner: &OwnerReference,
    configs: impl IntoIterator<Item = (String, String)>,
) -> Result<ConfigMap, serde_json::Error> {
    let data: serde_json::Map<String, Value> = configs
        .into_iter()
        .map(|(exit, config)| (config_key(&exit), Value::String(config)))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(gateway), "namespace": namespace,
            "labels": {LABEL_GATEWAY: gateway, "app.kubernetes.io/managed-by": "cloak"},
            "ownerReferences": [owner],
        },
        "data": data,
    }))
}

/// Inputs of [`pod`].
#[derive(Debug, Clone)]
pub struct ExitPod<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub gateway: &'a str,
    /// `cloak` itself (the operator's image).
    pub image: &'a str,
    /// The mask's copy of the provider's credentials.
    pub secret: &'a str,
    /// The server this pod connects to, and the copy's keys that make it a one-server Secret
    /// (`(file in the pod, key in the Secret)`, from `credentials::Pool::copy_keys`).
    pub server: &'a str,
    pub keys: Vec<(&'a str, &'a str)>,
    /// What the server's tunnel carries whole ([`ANNOTATION_TUNNEL_MTU`],
    /// `gateway::tunnel_fit`).
    pub tunnel_mtu: u16,
    /// The exit's mask (controller: the pod goes when the mask does).
    pub owner: OwnerReference,
    /// How long the agent drains once the pod is deleted: the kubelet waits that long, and a
    /// little more, before it kills it.
    pub drain_grace: std::time::Duration,
}

/// The exit pod: `cloak agent` with the one server's credentials and a few capabilities (it
/// creates the tunnel and the VXLAN end; the node's daemon turns on forwarding in its namespace),
/// ready while its tunnel passes its probe.
pub fn pod(input: &ExitPod<'_>) -> Result<Pod, serde_json::Error> {
    let items: Vec<Value> = input
        .keys
        .iter()
        .map(|(path, key)| json!({"key": key, "path": path}))
        .collect();
    let config = format!("{CONFIG_DIR}/{}", config_key(input.name));
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": input.name, "namespace": input.namespace,
            "labels": {
                LABEL_GATEWAY: input.gateway, LABEL_EXIT: input.name,
                "app.kubernetes.io/managed-by": "cloak", "app.kubernetes.io/component": "exit",
            },
            "annotations": {
                ANNOTATION_SERVER: input.server,
                ANNOTATION_TUNNEL_MTU: input.tunnel_mtu.to_string(),
            },
            "ownerReferences": [input.owner],
        },
        "spec": {
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds":
                input.drain_grace.as_secs() + u64::from(input.drain_grace.subsec_nanos() > 0) + STOP_SECONDS,
            // An exit whose agent stops is replaced by the operator on the next server, instead
            // of restarting on the same one.
            "restartPolicy": "Never",
            // A gateway's exits on different nodes when there are enough: losing a node loses
            // one exit, not the gateway.
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {LABEL_GATEWAY: input.gateway}},
                },
            }]}},
            "containers": [{
                "name": "agent", "image": input.image, "imagePullPolicy": "IfNotPresent",
                "args": [
                    "agent", "--config", config,
                    "--admin-token-file", format!("{ADMIN_TOKEN_DIR}/{ADMIN_TOKEN_KEY}"),
                    "--metrics-token-sha256-file", format!("{ADMIN_TOKEN_DIR}/{METRICS_HASH_KEY}"),
                ],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                // The least an exit needs, not privileged: NET_ADMIN for its tunnel, routes,
                // VXLAN end and nftables table; NET_RAW for its probe; MKNOD to make
                // `/dev/net/tun` (no host path is mounted); SETUID/SETGID for an OpenVPN
                // configuration that drops to another user. Its sysctls (forwarding) are set
                // by the node's daemon when its sandbox is made: its `/proc/sys` is read-only.
                "securityContext": {
                    "privileged": false,
                    "allowPrivilegeEscalation": false,
                    "capabilities": {
                        "drop": ["ALL"],
                        "add": ["NET_ADMIN", "NET_RAW", "MKNOD", "SETUID", "SETGID"],
                    },
                },
                "ports": [{"name": "admin", "containerPort": ADMIN_PORT}],
                "readinessProbe": {
                    "httpGet": {"path": "/readyz", "port": ADMIN_PORT},
                    "periodSeconds": 1, "failureThreshold": 1,
                },
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [
                    {"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": true},
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": true},
                    {"name": "admin", "mountPath": ADMIN_TOKEN_DIR, "readOnly": true},
                ],
            }],
            "volumes": [
                {"name": "credentials", "secret": {"secretName": input.secret, "items": items}},
                {"name": "config", "configMap": {"name": config_map_name(input.gateway)}},
                // Whole: a metrics reader hash written later reaches the running exit.
                {"name": "admin", "secret": {
                    "secretName": admin_secret_name(input.gateway),
                    "defaultMode": 0o400,
                }},
            ],
        },
    }))
}

/// An exit's pod as the gateway's status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub node: Option<String>,
    pub ip: Option<IpAddr>,
    /// `Pending`, `Running`, `Succeeded`, `Failed`.
    pub phase: Option<String>,
    pub ready: bool,
    pub deleting: bool,
    /// Why the agent container last stopped, or why the pod waits.
    pub reason: Option<String>,
}

impl PodView {
    pub fn of(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let container = status
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first());
        let reason = container
            .and_then(|c| c.state.as_ref())
            .and_then(|s| {
                s.waiting
                    .as_ref()
                    .and_then(|w| w.message.clone().or_else(|| w.reason.clone()))
                    .or_else(|| {
                        s.terminated
                            .as_ref()
                            .and_then(|t| t.message.clone().or_else(|| t.reason.clone()))
                    })
            })
            .or_else(|| status.and_then(|s| s.message.clone()));
        Self {
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            ip: status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            phase: status.and_then(|s| s.phase.clone()),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            reason,
        }
    }

    /// Whether the pod is done for and must be replaced (by a pod on the next server).
    pub fn is_finished(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Failed" | "Succeeded"))
    }
}

/// An exit's health and the words for it: from whether its mask holds a slot, and its pod.
/// `was` is the health the status showed before: an exit that was Healthy and is not ready now
/// is Unhealthy (its flows were moved), one that never was is still Connecting.
/// The annotation a user puts on an exit's pod to move the exit to its pool's next server (any
/// value), as when a site bans its address (gluetun#3391).
pub const ANNOTATION_MOVE: &str = "cloak.dev/move";
/// The annotation on an exit's mask that records its last move (when, from which server, why),
/// written by the operator alone and shown in the gateway's status.
pub const ANNOTATION_LAST_MOVE: &str = "cloak.dev/last-move";
/// How many times the exit has moved, on its VpnMask.
pub const ANNOTATION_MOVES: &str = "cloak.dev/moves";
/// How long an exit's tunnel may go without connecting before it moves, unless its gateway says
/// (`spec.exits.moveAfter`).
pub const MOVE_AFTER: std::time::Duration = std::time::Duration::from_mins(2);

/// Why an exit's running pod is to be replaced on its pool's next server, if it is: it stopped,
/// a user asked (`moved`: [`ANNOTATION_MOVE`]), or its tunnel has not connected for `down` (as
/// long as the status has shown it Connecting or Unhealthy), `limit` or more. A pod being deleted
/// is already going.
/// How long `node` has not been Ready (its `Ready` condition False or Unknown since its last
/// transition), at `now` (seconds since the epoch). None while it is Ready, or says nothing.
pub fn node_down_for(
    node: &k8s_openapi::api::core::v1::Node,
    now: i64,
) -> Option<std::time::Duration> {
    let ready = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    if ready.status == "True" {
        return None;
    }
    let since = ready.last_transition_time.as_ref()?.0.as_second();
    u64::try_from(now - since)
        .ok()
        .map(std::time::Duration::from_secs)
}

pub fn move_reason(
    pod: &PodView,
    moved: bool,
    down: Option<std::time::Duration>,
    limit: std::time::Duration,
) -> Option<String> {
    if pod.deleting {
        return None;
    }
    if pod.is_finished() {
        let why = pod.reason.clone().unwrap_or_else(|| "stopped".into());
        return Some(format!("its pod stopped ({why})"));
    }
    if moved {
        return Some(format!("its pod was annotated {ANNOTATION_MOVE}"));
    }
    match down {
        Some(down) if !pod.ready && down >= limit => Some(format!(
            "its tunnel had not connected for {}s",
            limit.as_secs()
        )),
        _ => None,
    }
}

pub fn health(
    slot_held: bool,
    pod: Option<&PodView>,
    was: Option<ExitHealth>,
) -> (ExitHealth, String) {
    let Some(pod) = pod else {
        return if slot_held {
            (ExitHealth::Pending, "creating its pod".into())
        } else {
            (ExitHealth::Pending, "waiting for a provider slot".into())
        };
    };
    if pod.deleting {
        return (ExitHealth::Draining, "its pod is being deleted".into());
    }
    if pod.is_finished() {
        let why = pod.reason.clone().unwrap_or_else(|| "pod stopped".into());
        return (ExitHealth::Unhealthy, format!("its pod stopped: {why}"));
    }
    if pod.node.is_none() {
        return (ExitHealth::Pending, "its pod waits to be scheduled".into());
    }
    if pod.ready {
        return (ExitHealth::Healthy, "its tunnel passes its probe".into());
    }
    let why = pod
        .reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    match was {
        Some(ExitHealth::Healthy | ExitHealth::Unhealthy) => (
            ExitHealth::Unhealthy,
            format!("its tunnel fails its probe{why}"),
        ),
        _ => (
            ExitHealth::Connecting,
            format!("its tunnel is connecting{why}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_moves_when_its_pod_stopped_a_user_asks_or_its_tunnel_stays_down_and_not_while_draining()
     {
        let limit = std::time::Duration::from_mins(2);
        let running = PodView {
            node: Some("n1".into()),
            ip: None,
            phase: Some("Running".into()),
            ready: false,
            deleting: false,
            reason: None,
        };
        let secs = std::time::Duration::from_secs;
        assert_eq!(move_reason(&running, false, Some(secs(119)), limit), None);
        assert_eq!(
            move_reason(&running, false, Some(secs(120)), limit).as_deref(),
            Some("its tunnel had not connected for 120s")
        );
        assert_eq!(
            move_reason(&running, false, None, limit),
            None,
            "never seen down"
        );
        let ready = PodView {
            ready: true,
            ..running.clone()
        };
        assert_eq!(
            move_reason(&ready, false, Some(secs(600)), limit),
            None,
            "it connected since"
        );
        assert!(
            move_reason(&ready, true, None, limit)
                .unwrap()
                .contains(ANNOTATION_MOVE)
        );
        let failed = PodView {
            phase: Some("Failed".into()),
            reason: Some("Error".into()),
            ..running.clone()
        };
        assert_eq!(
            move_reason(&failed, false, None, limit).as_deref(),
            Some("its pod stopped (Error)")
        );
        let draining = PodView {
            deleting: true,
            ..failed
        };
        assert_eq!(move_reason(&draining, true, Some(secs(600)), limit), None);
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "cloak.dev/v1alpha1".into(),
            kind: "VpnMask".into(),
            name: "g-exit-0".into(),
            uid: "u".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    #[test]
    fn an_exit_pod_mounts_one_server_as_a_one_server_secret_and_is_owned_by_its_mask() {
        let input = ExitPod {
            name: "g-exit-0",
            namespace: "ns",
            gateway: "g",
            image: "cloak:dev",
            secret: "g-exit-0-vpn-credentials",
            server: "nl-2",
            keys: vec![("wg0.conf", "nl-2.conf")],
            tunnel_mtu: 1420,
            owner: owner(),
            drain_grace: std::time::Duration::from_millis(90_500),
        };
        let pod = pod(&input).unwrap();
        let v = serde_json::to_value(&pod).unwrap();
        assert_eq!(
            v["spec"]["volumes"][0]["secret"],
            json!({"secretName": "g-exit-0-vpn-credentials", "items": [{"key": "nl-2.conf", "path": "wg0.conf"}]})
        );
        assert_eq!(v["metadata"]["annotations"][ANNOTATION_SERVER], "nl-2");
        assert_eq!(v["metadata"]["labels"][LABEL_GATEWAY], "g");
        assert_eq!(v["metadata"]["ownerReferences"][0]["kind"], "VpnMask");
        assert_eq!(
            v["spec"]["containers"][0]["args"],
            json!([
                "agent",
                "--config",
                "/etc/cloak/g-exit-0.yaml",
                "--admin-token-file",
                "/var/run/cloak/admin/token",
                "--metrics-token-sha256-file",
                "/var/run/cloak/admin/metrics-token-sha256"
            ])
        );
        // The gateway's admin Secret (its token, and the metrics reader's hash when there is
        // one), readable by the agent alone, whole: a new hash reaches the running pod.
        assert_eq!(
            v["spec"]["volumes"][2]["secret"],
            json!({"secretName": "g-exit-admin", "defaultMode": 256})
        );
        assert_eq!(v["metadata"]["annotations"][ANNOTATION_TUNNEL_MTU], "1420");
        assert!(
            v["metadata"]["labels"].get("cloak.dev/gateway").is_none(),
            "an exit never carries the client label"
        );
        assert_eq!(
            v["spec"]["terminationGracePeriodSeconds"], 101,
            "the drain grace, rounded up, and time to stop"
        );
        // The metrics reader: its token's hash, never the token; a patch sets or clears it.
        let hash = token_sha256("reader");
        assert_eq!(
            hash,
            "3d0941964aa3ebdcb00ccef58b1bb399f9f898465e9886d5aec7f31090a0fb30"
        );
        let secret = admin_secret("g", "ns", &owner(), "t", Some(&hash)).unwrap();
        let secret = serde_json::to_value(&secret).unwrap();
        assert_eq!(secret["stringData"][METRICS_HASH_KEY], hash);
        assert_eq!(
            secret["metadata"]["annotations"][ANNOTATION_METRICS_HASH],
            hash
        );
        assert_eq!(
            metrics_hash_patch(None)["data"][METRICS_HASH_KEY],
            Value::Null
        );
        assert!(metrics_hash_patch(None)["data"].is_object());
        assert_eq!(
            metrics_hash_patch(Some(&hash))["stringData"][METRICS_HASH_KEY],
            hash
        );
        assert_eq!(
            drain_grace_of(&pod),
            Some(std::time::Duration::from_secs(91))
        );
    }

    #[test]
    fn a_node_is_down_from_when_its_ready_condition_left_true() {
        let node = |status: &str, since: &str| -> k8s_openapi::api::core::v1::Node {
            serde_json::from_value(json!({
                "metadata": {"name": "n1"},
                "status": {"conditions": [
                    {"type": "MemoryPressure", "status": "False", "lastTransitionTime": "2026-12-07T00:00:00Z"},
                    {"type": "Ready", "status": status, "lastTransitionTime": since},
                ]},
            }))
            .unwrap()
        };
        let now = "2026-12-07T00:05:00Z"
            .parse::<k8s_openapi::jiff::Timestamp>()
            .unwrap()
            .as_second();
        assert_eq!(
            node_down_for(&node("True", "2026-12-07T00:00:00Z"), now),
            None
        );
        assert_eq!(
            node_down_for(&node("Unknown", "2026-12-07T00:03:00Z"), now),
            Some(std::time::Duration::from_mins(2))
        );
        assert_eq!(
            node_down_for(&node("False", "2026-12-07T00:04:30Z"), now),
            Some(std::time::Duration::from_secs(30))
        );
        let silent: k8s_openapi::api::core::v1::Node =
            serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap();
        assert_eq!(node_down_for(&silent, now), None);
    }

    #[test]
    fn the_public_address_is_read_from_the_agents_status_answer() {
        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"phase\":\"connected\",\"ready\":true,\"exitAddress\":\"198.51.100.7\"}";
        assert_eq!(
            public_address(answer),
            Some("198.51.100.7".parse().unwrap())
        );
        assert_eq!(public_address("{\"exitAddress\":null}"), None);
        assert_eq!(public_address("HTTP/1.1 500 oops\r\n\r\nnot json"), None);
    }

    #[test]
    fn an_exit_config_names_its_vni_mss_probe_and_bypass() {
        let bypass: Vec<IpNet> = vec!["10.244.0.0/16".parse().unwrap()];
        let text = agent_config(&ExitAgent {
            vni: 4096,
            mss: 1330,
            probe: "http://203.0.113.10/ip",
            bypass: &bypass,
            cluster_domains: &[],
            upstream: None,
            drain_grace: DEFAULT_DRAIN_GRACE,
            link_mtu: 1450,
            underlay_mtu: None,
            forwards: &[],
        });
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["exit"],
            json!({"vni": 4096, "mss": 1330, "linkMtu": 1450, "drainGrace": "300000ms"})
        );
        assert_eq!(v["bypass"], json!(["10.244.0.0/16"]));
        assert_eq!(v["health"]["probe"], "http://203.0.113.10/ip");
        assert!(v.get("dns").is_none(), "the credentials' resolver");

        let domains = vec!["cluster.local".to_owned(), "corp.internal".to_owned()];
        let text = agent_config(&ExitAgent {
            vni: 4096,
            mss: 1330,
            probe: "http://203.0.113.10/ip",
            bypass: &bypass,
            cluster_domains: &domains,
            upstream: Some("9.9.9.9".parse().unwrap()),
            drain_grace: std::time::Duration::ZERO,
            link_mtu: 1450,
            underlay_mtu: None,
            forwards: &[
                ExitForward {
                    name: "torrent".into(),
                    protocols: vec![crate::natpmp::Protocol::Tcp, crate::natpmp::Protocol::Udp],
                    target: "10.96.0.50:6881".parse().unwrap(),
                    external: None,
                    gateway: None,
                    backends: Vec::new(),
                },
                ExitForward {
                    name: "web".into(),
                    protocols: vec![crate::natpmp::Protocol::Tcp],
                    target: "10.96.0.51:80".parse().unwrap(),
                    external: Some(51413),
                    gateway: None,
                    backends: vec![Backend {
                        address: "10.244.1.5:8080".parse().unwrap(),
                        node: "198.19.0.11".parse().unwrap(),
                    }],
                },
            ],
        });
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["exit"]["clusterDomains"], json!(domains));
        assert_eq!(v["dns"], "9.9.9.9");
        assert_eq!(
            v["exit"]["forwards"],
            json!([
                {"name": "torrent", "protocols": ["tcp", "udp"], "target": "10.96.0.50:6881"},
                {"name": "web", "protocols": ["tcp"], "target": "10.96.0.51:80", "external": 51413,
                 "backends": [{"address": "10.244.1.5:8080", "node": "198.19.0.11"}]}
            ])
        );
    }

    #[test]
    fn an_exits_refused_ports_are_read_with_their_reasons() {
        let answer = "HTTP/1.0 200 OK\r\n\r\n{\"forwards\":[\
            {\"name\":\"web\",\"protocol\":\"tcp\",\"port\":40000},\
            {\"name\":\"web\",\"protocol\":\"udp\",\"port\":0,\"error\":\"the gateway answered: not authorized\"},\
            {\"name\":\"new\",\"protocol\":\"tcp\",\"port\":0}]}";
        // A port still being asked for (no error yet) is no failure.
        assert_eq!(
            port_failures(answer),
            ["web/UDP: the gateway answered: not authorized"]
        );
        assert!(port_failures("not json").is_empty());
    }

    #[test]
    fn an_exits_forwarded_ports_are_read_from_its_status_answer_and_unmapped_ones_left_out() {
        let answer = "HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"exitAddress\":\"198.51.100.11\",\"forwards\":[\
            {\"name\":\"web\",\"protocol\":\"udp\",\"port\":40001,\"source\":\"natpmp\"},\
            {\"name\":\"web\",\"protocol\":\"tcp\",\"port\":40000,\"source\":\"natpmp\"},\
            {\"name\":\"other\",\"protocol\":\"tcp\",\"port\":0,\"error\":\"refused\"},\
            {\"name\":\"odd\",\"protocol\":\"sctp\",\"port\":9}]}";
        let ports = forwarded_ports(answer);
        assert_eq!(
            ports,
            vec![
                cloak_api::ForwardedPort {
                    name: "web".into(),
                    protocol: "TCP".into(),
                    port: 40000
                },
                cloak_api::ForwardedPort {
                    name: "web".into(),
                    protocol: "UDP".into(),
                    port: 40001
                },
            ]
        );
        assert!(forwarded_ports("not json").is_empty());
        assert_eq!(
            public_address(answer),
            Some("198.51.100.11".parse().unwrap())
        );
    }

    fn view(node: Option<&str>, phase: &str, ready: bool) -> PodView {
        PodView {
            node: node.map(Into::into),
            ip: None,
            phase: Some(phase.into()),
            ready,
            deleting: false,
            reason: None,
        }
    }

    #[test]
    fn an_exit_is_healthy_only_while_its_pod_is_ready_and_unhealthy_once_it_was() {
        use ExitHealth::*;
        assert_eq!(health(false, None, None).0, Pending);
        assert_eq!(health(true, None, None).0, Pending);
        assert_eq!(
            health(true, Some(&view(None, "Pending", false)), None).0,
            Pending
        );
        let running = view(Some("n1"), "Running", false);
        assert_eq!(health(true, Some(&running), None).0, Connecting);
        assert_eq!(health(true, Some(&running), Some(Healthy)).0, Unhealthy);
        assert_eq!(health(true, Some(&running), Some(Unhealthy)).0, Unhealthy);
        let ready = view(Some("n1"), "Running", true);
        assert_eq!(health(true, Some(&ready), Some(Unhealthy)).0, Healthy);
        let failed = view(Some("n1"), "Failed", false);
        assert!(failed.is_finished());
        assert_eq!(health(true, Some(&failed), None).0, Unhealthy);
        let deleting = PodView {
            deleting: true,
            ..ready
        };
        assert_eq!(health(true, Some(&deleting), Some(Healthy)).0, Draining);
    }
}
